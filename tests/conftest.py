import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may reach a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


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
