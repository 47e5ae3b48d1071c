"""The shipped Kubernetes manifest is consistent: N in its three places, the key from a Secret, /out on a PVC."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
MANIFEST = REPO / "deploy" / "kubernetes" / "indexed-job.yaml"


@pytest.fixture(scope="module")
def docs() -> list[dict[str, Any]]:
    yaml = pytest.importorskip("yaml")
    return [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]


def test_indexed_job_runs_n_shards(docs: list[dict[str, Any]]) -> None:
    (job,) = [d for d in docs if d["kind"] == "Job"]
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    (container,) = spec["template"]["spec"]["containers"]
    args = container["args"]
    assert [container["command"][0], *args[:2]] == ["batchgate", "run", "/data/prompts.jsonl"]
    n = int(args[args.index("--shards") + 1])
    assert spec["completions"] == spec["parallelism"] == n
    assert args[args.index("--out") + 1] == "/out"
    assert spec["template"]["spec"]["restartPolicy"] == "Never"  # podFailurePolicy requires it
    # JOB_COMPLETION_INDEX comes from Kubernetes: the manifest must not set it.
    assert "JOB_COMPLETION_INDEX" not in {e["name"] for e in container.get("env", [])}


def test_key_comes_from_a_secret_and_out_from_a_claim(docs: list[dict[str, Any]]) -> None:
    (job,) = [d for d in docs if d["kind"] == "Job"]
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    (key,) = [e for e in container["env"] if e["name"] == "GONKAGATE_API_KEY"]
    assert "value" not in key and key["valueFrom"]["secretKeyRef"]["name"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    claims = {d["metadata"]["name"]: d for d in docs if d["kind"] == "PersistentVolumeClaim"}
    out_claim = volumes[mounts["/out"]]["persistentVolumeClaim"]["claimName"]
    assert "ReadWriteMany" in claims[out_claim]["spec"]["accessModes"]
    assert volumes[mounts["/data"]]["persistentVolumeClaim"]["claimName"] in claims
    assert "gp-" not in MANIFEST.read_text()  # no key pasted in


def test_the_exit_codes_in_the_failure_policy_match_the_runner(docs: list[dict[str, Any]]) -> None:
    from batchgate.runner import EXIT_CODES

    (job,) = [d for d in docs if d["kind"] == "Job"]
    rules = job["spec"]["podFailurePolicy"]["rules"]
    by_action = {r["action"]: r.get("onExitCodes", {}).get("values") for r in rules}
    assert by_action["FailJob"] == [EXIT_CODES["auth"]] == [EXIT_CODES["unreachable"]]
    assert by_action["FailIndex"] == [EXIT_CODES["balance"]] == [EXIT_CODES["budget"]]


def test_the_docs_explain_the_manifest() -> None:
    text = (REPO / "docs" / "kubernetes.md").read_text()
    assert "deploy/kubernetes/indexed-job.yaml" in text
    for word in ("JOB_COMPLETION_INDEX", "--shards", "shard-K-of-N", "batchgate export", "batchgate status"):
        assert word in text, word
