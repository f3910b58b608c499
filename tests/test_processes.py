"""The suite's own guard: a process that a test leaves behind fails the run and is killed, even when it
was orphaned in a session of its own (as torchrun's workers are once torchrun is killed)."""
import os
import subprocess
import sys
import textwrap

from conftest import CODE, REPO, descendants, kill_tree

LEAKY_TEST = textwrap.dedent("""
    import subprocess, time

    def test_leaves_an_orphan_behind(tmp_path):
        # bash starts sleep in a new session and exits at once: sleep is orphaned, as a torchrun worker is
        subprocess.run(["bash", "-c", "setsid sleep 300 > /dev/null 2>&1 &"], check=True)
        time.sleep(0.5)
""")


def run_inner_suite(tmp_path, body):
    (tmp_path / "test_inner.py").write_text(body)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(REPO, "tests"), CODE]))
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p", "no:cacheprovider",
                           "--rootdir", str(tmp_path), str(tmp_path / "test_inner.py")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def sleepers():
    return [pid for pid in os.listdir("/proc") if pid.isdigit() and _cmdline(pid) == "sleep 300"]


def _cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def test_a_left_process_fails_the_suite_and_is_killed(tmp_path):
    before = set(sleepers())
    proc = run_inner_suite(tmp_path, LEAKY_TEST)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "1 passed" in proc.stdout
    assert "outlived them (now killed)" in proc.stderr and "sleep 300" in proc.stderr
    assert set(sleepers()) == before      # the orphan is gone


def test_a_clean_suite_passes(tmp_path):
    proc = run_inner_suite(tmp_path, "def test_nothing():\n    assert 1 + 1 == 2\n")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "outlived" not in proc.stderr


def test_kill_tree_reaches_workers_in_sessions_of_their_own():
    # a launcher (bash) whose worker (sleep) runs in a session of its own, as torchrun's workers do
    launcher = subprocess.Popen(["bash", "-c", "setsid sleep 300 & wait"], start_new_session=True)
    for _ in range(100):
        below = descendants(launcher.pid)
        if below:
            break
        subprocess.run(["sleep", "0.05"])
    assert [command for _, command in below] == ["sleep 300"]
    kill_tree(launcher.pid)
    assert launcher.wait(timeout=10) == -9
    assert not descendants(launcher.pid) and not any(pid == str(below[0][0]) for pid in sleepers())
