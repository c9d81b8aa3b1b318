"""Two pipelines at once in one repository: DVC refuses the second `dvc repro` (its lock) and reruns a killed one;
outside DVC, a second build of the same cache folder is refused by the cache's own lock file, while the first
finishes to a consistent cache, and the lock dies with its holder (a kill -9 leaves none behind)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from flux2.cache_store import LOCK_FILE
from flux2.cli import main
from tests.reliability.helpers import (assert_same_tensors, cache_contents, copy_project, start, subprocess_env,
                                      wait_for)

pytestmark = pytest.mark.slow

# The stage runs until the file `go` appears (at most 60 s): long enough for a second `dvc repro` to start on a
# loaded machine (a fixed 3 s was not), and no wait at all for the rerun, which the test lets go at once.
SLOW_STAGE = """\
stages:
  slow:
    cmd: >-
      python -c "import pathlib as p, time; p.Path('started').touch();
      any(p.Path('go').exists() or time.sleep(0.05) for _ in range(1200)); p.Path('out.txt').write_text('done')"
    outs:
      - out.txt
"""


def test_second_dvc_repro_is_refused_and_a_killed_one_reruns(tmp_path):
    dvc = str(Path(sys.executable).parent / "dvc")
    env = subprocess_env()
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True, env=env)
    subprocess.run([dvc, "init", "-q"], cwd=tmp_path, check=True, env=env)
    (tmp_path / "dvc.yaml").write_text(SLOW_STAGE)

    first = subprocess.Popen([dvc, "repro"], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    wait_for(first, (tmp_path / "started").exists)
    second = subprocess.run([dvc, "repro"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert second.returncode != 0
    assert "is busy, it is being blocked by" in second.stderr or "Unable to acquire lock" in second.stderr, \
        second.stderr
    os.killpg(first.pid, signal.SIGKILL)  # the first dies mid-stage, holding DVC's locks
    first.wait()
    assert not (tmp_path / "out.txt").exists()

    (tmp_path / "go").touch()
    rerun = subprocess.run([dvc, "repro"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert (tmp_path / "out.txt").read_text() == "done" and (tmp_path / "dvc.lock").is_file()


def test_second_cache_build_of_one_folder_is_refused_and_the_first_finishes(project, reference, tmp_path, capsys):
    # The second build starts once the first has made the lock file; on a loaded machine the first may finish
    # its (tiny) build before the second gets to the lock. Then the second finds a complete cache and encodes
    # nothing: no test of the lock, so the round is run again. A second build that encodes is a lock that failed.
    for attempt in range(3):
        folder = copy_project(project, tmp_path / f"p{attempt}")
        cache_dir = folder / "cache" / "latents"
        first = start(folder, "-m", "flux2.cli", "cache-latents", "--params", "params.yaml")
        wait_for(first, (cache_dir / LOCK_FILE).exists)  # the first holds the lock from here to its build's end
        second = main(["cache-latents", "--params", str(folder / "params.yaml")])
        _, err = first.communicate(timeout=300)
        assert first.returncode == 0, err.decode()[-2000:]
        if second == 2:
            break
        report = json.loads((folder / "reports" / "cache_latents.json").read_text())
        assert report["encoded"] == 0, f"a second build ran beside the first and encoded: {report}"
    else:
        pytest.fail("in 3 rounds the first build finished before the second reached the lock")
    assert f"{cache_dir} is being built by another process" in capsys.readouterr().err
    assert_same_tensors(cache_contents(cache_dir), reference["latents"][1], "latents cache")

    assert main(["cache-latents", "--params", str(folder / "params.yaml")]) == 0  # the lock is free again
    report = json.loads((folder / "reports" / "cache_latents.json").read_text())
    assert report["encoded"] == 0 and report["reused"] == len(reference["latents"][1])
    assert (cache_dir / LOCK_FILE).stat().st_size == 0  # an empty file: the folder's content stays stable
