"""The suite's leak check (conftest.py) turns a child process left running into an error of
the test that started it, and the session still returns."""
from pathlib import Path

LEAKING_TEST = '''
import multiprocessing
import signal
import time


def ignore_stop_and_sleep():
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(3600)


def test_leaks_a_worker():
    multiprocessing.get_context("spawn").Process(target=ignore_stop_and_sleep).start()


def test_clean():
    pass
'''


def test_a_leaked_child_fails_its_test_and_the_session_returns(pytester):
    pytester.makeconftest((Path(__file__).parent / "conftest.py").read_text())
    pytester.makepyfile(test_leak=LEAKING_TEST)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=120)
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(["*ERROR at teardown of test_leaks_a_worker*",
                                 "*left 1 child process(es) running*"])
