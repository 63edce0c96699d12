"""``medseg node`` as a real process: ``--once``, ``status``, SIGTERM, SIGKILL while receiving / segmenting /
sending (then a restart delivers every series exactly once per SOP Instance UID), a destination that is
down (backoff, ``send-failed``, ``node retry``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from medseg.testing.orthanc import free_port

from .conftest import (
    NODE_CMD,
    ROOT,
    NodeProcess,
    RecordingScp,
    delivery_states,
    job_states,
    no_temps,
    phantom_ct,
    send,
    wait_for,
)

pytestmark = pytest.mark.slow


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([*NODE_CMD, *args], capture_output=True, text=True, cwd=ROOT, env=env)


def _seg_uids(workdir) -> set[str]:
    return {
        pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID
        for p in (workdir / "outputs").glob("*_seg.dcm")
    }


def _check_clean(workdir) -> None:
    """Nothing half-written: no temporary file anywhere, every mask with its sidecar and SEG, no orphans."""
    assert not no_temps(workdir)
    outputs = workdir / "outputs"
    masks = {p.name[: -len(".nii.gz")] for p in outputs.glob("*.nii.gz")}
    assert masks and masks == {p.stem for p in outputs.glob("*.json")}
    assert masks == {p.name[: -len("_seg.dcm")] for p in outputs.glob("*_seg.dcm")}


def test_once_segments_and_sends_then_status(tmp_path, segmenting_run, tiny_dataset, pacs):
    workdir = tmp_path / "node"
    written = phantom_ct(tiny_dataset, tmp_path / "ct")  # before the node: --once exits after 2 s idle
    node = NodeProcess(workdir, segmenting_run, "--stable-seconds", "2", "--once", "--send", pacs.url)
    assert set(send(node.port, written.files)) == {0}
    assert node.wait() == 0, node.err.read_text()
    assert job_states(workdir) == [(1, "done")]
    assert pacs.stored() == _seg_uids(workdir) and len(pacs.stored()) == 1
    status = json.loads(_cli("status", "--workdir", str(workdir), "--json").stdout)
    assert status["jobs"]["done"] == 1 and status["destinations"][pacs.url]["done"] == 1
    text = _cli("status", "--workdir", str(workdir)).stdout
    assert "done 1" in text and f"{pacs.url}: 1 done, 0 pending, 0 failed" in text
    _check_clean(workdir)
    lines = (workdir / "logs" / "node.jsonl").read_text().splitlines()
    states = [e["state"] for e in map(json.loads, lines) if e["event"] == "job"]
    assert states == ["receiving", "queued", "running", "sending", "done"]


def test_sigterm_finishes_the_job_in_hand_and_exits_143(tmp_path, segmenting_run, tiny_dataset, pacs):
    workdir = tmp_path / "node"
    node = NodeProcess(workdir, segmenting_run, "--stable-seconds", "0.5", "--send", pacs.url)
    pacs.delay_s = 0.0
    written = phantom_ct(tiny_dataset, tmp_path / "ct")
    assert set(send(node.port, written.files)) == {0}
    wait_for(lambda: (1, "running") in job_states(workdir), what="running")
    assert node.kill(signal.SIGTERM) == 143
    state = job_states(workdir)[0][1]
    assert state in ("sending", "done")  # the segmentation in hand was finished, not cut
    assert send(node.port, written.files[:1]) == []  # no longer listening
    again = NodeProcess(workdir, segmenting_run, "--stable-seconds", "1", "--once", "--send", pacs.url)
    assert again.wait() == 0
    assert job_states(workdir) == [(1, "done")] and pacs.stored() == _seg_uids(workdir)
    _check_clean(workdir)


def _kill_mid_association(node: NodeProcess, files) -> None:
    """Send half of ``files`` on an open association, SIGKILL the node, then find the association dead."""
    ae = AE(ae_title="SCU")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="MEDSEG")
    half = len(files) // 2
    assert [assoc.send_c_store(f).Status for f in files[:half]] == [0] * half
    node.kill()
    try:
        assert assoc.send_c_store(files[half]).get("Status") is None  # no answer from a dead node
    except RuntimeError:  # pynetdicom already saw the connection go
        pass
    assert not assoc.is_established


@pytest.mark.parametrize("phase", ["receiving", "segmenting", "sending"])
def test_kill_9_then_restart_delivers_each_output_exactly_once(tmp_path, segmenting_run, tiny_dataset, phase):
    workdir = tmp_path / "node"
    pacs = RecordingScp(tmp_path / "pacs", delay_s=3.0 if phase == "sending" else 0.0)
    args = ("--stable-seconds", "2", "--send", pacs.url)
    first = phantom_ct(tiny_dataset, tmp_path / "ct1", patient_id="K1")
    second = phantom_ct(tiny_dataset, tmp_path / "ct2", patient_id="K2")
    nodes = [NodeProcess(workdir, segmenting_run, *args)]
    try:
        assert set(send(nodes[0].port, first.files)) == {0}
        if phase == "receiving":  # first series delivered, the second cut in the middle of its association
            wait_for(lambda: job_states(workdir) == [(1, "done")], what="first series done")
            _kill_mid_association(nodes[0], second.files)
        elif phase == "segmenting":
            assert set(send(nodes[0].port, second.files)) == {0}
            wait_for(lambda: "running" in dict(job_states(workdir)).values(), what="a job running")
            nodes[0].kill()
        else:
            # the SEG has reached the PACS, whose answer is held back: the node dies before the acknowledgement
            wait_for(lambda: "sending" in delivery_states(workdir), what="a delivery in flight")
            wait_for(lambda: sum(pacs.arrivals.values()) == 1, what="the SEG at the PACS, unanswered")
            nodes[0].kill()
        assert nodes[0].proc.returncode == -signal.SIGKILL
        pacs.delay_s = 0.0
        nodes.append(NodeProcess(workdir, segmenting_run, *args))
        assert set(send(nodes[1].port, second.files)) == {0}  # the PACS sends the series (again)
        wait_for(
            lambda: [s for _, s in job_states(workdir)] == ["done", "done"], timeout=90, what="both done"
        )
        assert nodes[1].kill(signal.SIGTERM) == 143
        assert len(pacs.stored()) == 2 and pacs.stored() == _seg_uids(workdir)  # one SEG per series
        assert set(pacs.arrivals) == pacs.stored()
        if phase == "sending":  # the SEG in flight arrived, was not acknowledged, and came again: same UID
            assert sorted(pacs.arrivals.values()) == [1, 2]
        _check_clean(workdir)
    finally:
        pacs.stop()
        for node in nodes:
            node.stop()


def test_destination_down_backs_off_to_send_failed_then_retry_delivers(
    tmp_path, segmenting_run, tiny_dataset
):
    workdir, port = tmp_path / "node", free_port()
    url = f"dimse://PACS@127.0.0.1:{port}"
    args = ("--stable-seconds", "0.5", "--send", url, "--send-attempts", "3", "--send-backoff", "0.5")
    node = NodeProcess(workdir, segmenting_run, *args)
    pacs = None
    try:
        written = phantom_ct(tiny_dataset, tmp_path / "ct")
        assert set(send(node.port, written.files)) == {0}
        wait_for(lambda: job_states(workdir) == [(1, "send-failed")], timeout=60, what="send-failed")
        attempts = [e for e in map(json.loads, (workdir / "logs" / "node.jsonl").read_text().splitlines())
                    if e["event"] == "job" and e.get("destination") == url]  # fmt: skip
        assert [e["attempt"] for e in attempts] == [1, 2, 3]
        from datetime import datetime

        times = [datetime.fromisoformat(e["time"]).timestamp() for e in attempts]
        assert times[2] - times[1] >= 0.9 * 2 * (times[1] - times[0]) - 0.3 >= 0  # backoff doubles
        status = _cli("status", "--workdir", str(workdir)).stdout
        assert "send-failed 1" in status and f"{url}: 0 done, 0 pending, 1 failed" in status
        pacs = RecordingScp(tmp_path / "pacs", port=port)
        out = _cli("retry", "--workdir", str(workdir))
        assert out.returncode == 0 and "1 job(s) queued again: 1" in out.stdout
        wait_for(lambda: job_states(workdir) == [(1, "done")], timeout=30, what="delivered after retry")
        assert pacs.stored() == _seg_uids(workdir)
        assert _cli("retry", "--workdir", str(workdir), "1").returncode == 1  # nothing to retry any more
    finally:
        node.stop()
        if pacs is not None:
            pacs.stop()


def test_status_of_a_folder_that_is_not_a_node(tmp_path):
    out = _cli("status", "--workdir", str(tmp_path))
    assert out.returncode == 2 and out.stderr.startswith("error: ") and "not a node work folder" in out.stderr
    assert "Traceback" not in out.stderr and sys.executable
