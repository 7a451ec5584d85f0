"""Shared pytest configuration for the flash_attn test suite.

* tests/ is put on sys.path so test modules can `import reference` / `import helpers` whatever
  pytest's import mode is;
* every test is seeded from a hash of its node id: inputs are fresh random data (never zeros),
  different for every case, but reproducible when a single test is re-run;
* TF32 is disabled so the float32 reference really is float32;
* FLASH_ATTN_TEST_SM90=0 turns the Hopper forward and backward off for the whole run
  (set_sm90_forward, set_sm90_backward), so on an H100 the suite covers the SM80 kernels that
  sm_80/86/89 GPUs run;
* each failure is reported on its own line as soon as the test ends (node id and the assertion's
  message), so a run stopped at a time limit before pytest's summary still says what failed.
"""

import os
import random
import sys
import zlib

import pytest
import torch

_TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

if os.environ.get("FLASH_ATTN_TEST_SM90", "1") == "0":
    try:
        import flash_attn_2_cuda

        flash_attn_2_cuda.set_sm90_forward(False)
        flash_attn_2_cuda.set_sm90_backward(False)
    except ImportError:
        pass


@pytest.fixture(autouse=True)
def _seed_per_test(request):
    seed = zlib.crc32(request.node.nodeid.encode("utf-8")) & 0x7FFFFFFF
    random.seed(seed)
    torch.manual_seed(seed)  # seeds the CUDA generators too
    yield


@pytest.fixture
def require_kernel():
    """Returns f(head_dim, dtype): skips the test when this build lacks the kernel."""
    import helpers

    return helpers.require_kernel


# The terminal reporter, for failures reported as they happen (pytest_runtest_logreport).
_terminal_reporter = None


@pytest.hookimpl(trylast=True)  # after the terminal reporter registers itself
def pytest_configure(config):
    global _terminal_reporter
    _terminal_reporter = config.pluginmanager.get_plugin("terminalreporter")


def pytest_runtest_logreport(report):
    if not report.failed or _terminal_reporter is None:
        return
    crash = getattr(report.longrepr, "reprcrash", None)
    message = crash.message if crash is not None else (str(report.longrepr).strip().splitlines() or [""])[-1]
    message = " | ".join(message.splitlines())[:400]
    _terminal_reporter.write_line(f"FAILED {report.nodeid} ({report.when}): {message}")
