import os
import sys

# Spinning OpenMP workers collapse when another process holds a core (seen: 10x slower steps
# on a busy 2-core machine); passive waiting costs nothing when the machine is idle.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

# Triton reads TRITON_INTERPRET when it is first imported (torchvision imports it), so the
# kernel tests can run through the interpreter in-process only if it is set before that.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def single_thread():
    """Run a test with one intra-op thread (tiny models are faster without thread overhead)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def fresh_accelerate():
    """Each training script run in this process builds its own Accelerator; forget the last one
    (use with ``pytestmark = pytest.mark.usefixtures("fresh_accelerate")``)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
