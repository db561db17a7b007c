"""Fixtures shared by the Python tests."""
import argparse
import sys
import textwrap

import pytest

# DeepSpeed's classes, as modules of their real names (DeepSpeed itself is
# not installed here), so that torch.save writes what DeepSpeed writes.
FAKE_DEEPSPEED = {
    "deepspeed/__init__.py": "",
    "deepspeed/runtime/__init__.py": "",
    "deepspeed/runtime/zero/__init__.py": "",
    "deepspeed/runtime/zero/config.py": textwrap.dedent("""
        import enum
        class ZeroStageEnum(int, enum.Enum):
            disabled = 0
            optimizer_states = 1
            gradients = 2
            weights = 3
            max_stage = 4
    """),
    "deepspeed/runtime/fp16/__init__.py": "",
    "deepspeed/runtime/fp16/loss_scaler.py": textwrap.dedent("""
        class LossScaler:
            def __init__(self, scale):
                self.cur_scale = scale
        class DynamicLossScaler(LossScaler):
            pass
    """),
    "deepspeed/utils/__init__.py": "",
    "deepspeed/utils/tensor_fragment.py": textwrap.dedent("""
        import dataclasses
        @dataclasses.dataclass
        class fragment_address:
            numel: int
            start: int
    """),
}


@pytest.fixture(scope="module")
def fake_deepspeed(tmp_path_factory):
    """The classes (ZeroStageEnum, LossScaler, DynamicLossScaler,
    fragment_address) of a stand-in deepspeed package on sys.path."""
    root = tmp_path_factory.mktemp("fake_ds")
    for name, text in FAKE_DEEPSPEED.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    for m in [m for m in sys.modules if m == "deepspeed" or m.startswith("deepspeed.")]:
        del sys.modules[m]  # stand-ins of another test
    sys.path.insert(0, str(root))
    import deepspeed.runtime.fp16.loss_scaler as ls
    import deepspeed.runtime.zero.config as zc
    import deepspeed.utils.tensor_fragment as tf
    yield types_of(zc, ls, tf)
    sys.path.remove(str(root))
    for m in [m for m in sys.modules if m == "deepspeed" or m.startswith("deepspeed.")]:
        del sys.modules[m]


def types_of(zc, ls, tf):
    return argparse.Namespace(ZeroStageEnum=zc.ZeroStageEnum, LossScaler=ls.LossScaler,
                              DynamicLossScaler=ls.DynamicLossScaler,
                              fragment_address=tf.fragment_address)

