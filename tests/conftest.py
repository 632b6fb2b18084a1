import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may reach a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="module")
def one_thread():
    """One thread for a module: bit-identity between runs is a single-thread property, and the tiny models are
    all overhead (with two threads on a busy 2-core machine a 10 ms run takes a second)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def module_snapshot(*objs) -> list:
    """Everything fastdiff could have left behind on modules/schedulers: instance attributes and torch hooks."""
    out = []
    for obj in objs:
        modules = obj.named_modules() if isinstance(obj, torch.nn.Module) else [("", obj)]
        for name, m in modules:
            d = m.__dict__
            hooks = tuple(len(d.get(k, {})) for k in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks"))
            extra = sorted(k for k in d if not k.startswith("_") or k.startswith("_fastdiff"))
            out.append((name, type(m).__name__, hooks, tuple(extra), d.get("forward")))
    return out


@pytest.fixture
def snapshot():
    return module_snapshot
