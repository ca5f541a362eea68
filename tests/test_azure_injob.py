"""What the components run inside their jobs: gathering data (assets resolved at run time), sharding, merging
shards, the teacher key handed only to the stage process, and registering the student with the champion rule."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import records

from azdistill.azure import injob
from azdistill.errors import StageFailed


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_prepare_data_copies_files_and_records_the_version(tmp_path):
    files = {split: write_jsonl(tmp_path / "in" / f"{split}.jsonl", records("qa", 3)) for split in ("train", "validation", "test")}
    info = injob.prepare_data(files, {}, "2024-05", tmp_path / "out")
    assert info == {"version": "2024-05", "splits": {split: {"source": "file"} for split in files}}
    assert (tmp_path / "out" / "train.jsonl").read_text() == files["train"].read_text()


def test_prepare_data_resolves_the_latest_asset_version_when_the_job_runs(tmp_path, monkeypatch):
    asked = []

    class Data:
        def get(self, name, version=None, label=None):
            asked.append((name, version, label))
            return SimpleNamespace(name=name, version="7" if label == "latest" else version, type="uri_file", path=f"azureml://subscriptions/s/resourcegroups/r/workspaces/w/datastores/workspaceblobstore/paths/data/{name}.jsonl")

    downloads = []
    monkeypatch.setattr(injob, "download_datastore_file", lambda client, credential, uri, target: (downloads.append(uri), target.write_text("{}\n")))
    client = SimpleNamespace(data=Data())
    assets = {"train": "azureml:s-train@latest", "validation": "azureml:s-val@latest", "test": "azureml:s-test:3"}
    info = injob.prepare_data({}, assets, "ignored", tmp_path / "out", client_factory=lambda: (client, object()))
    assert asked == [("s-train", None, "latest"), ("s-val", None, "latest"), ("s-test", "3", None)]
    assert info["version"] == "s-test:3,s-train:7,s-val:7"
    assert downloads[0].endswith("/paths/data/s-train.jsonl")


def test_shards_are_contiguous_never_empty_and_merge_back_in_order(tmp_path):
    data = tmp_path / "data"
    train = [{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": f"q{i}"}]} for i in range(10)]
    write_jsonl(data / "train.jsonl", train)
    write_jsonl(data / "validation.jsonl", train[:3])
    assert injob.shard(data, 5, tmp_path / "manifests") == 3  # validation has only 3 records
    manifests = sorted((tmp_path / "manifests").glob("shard-*.json"))
    assert [json.loads(path.read_text())["train"] for path in manifests] == [f"shards/train-{i:05d}.jsonl" for i in range(3)]

    # each shard answered by "synthesize" (simulated: its stage folder), then merged
    from azdistill.stages import state

    shards = tmp_path / "shards"
    for path in manifests:
        manifest = json.loads(path.read_text())
        out = shards / f"shard-{manifest['shard']:05d}"
        out.mkdir(parents=True)
        for split in ("train", "validation"):
            (out / f"{split}.jsonl").write_text((data / manifest[split]).read_text())
        (out / "rejected.jsonl").write_text("")
        (out / "stats.json").write_text(json.dumps({"splits": {"train": {"kept": 1}}, "seconds": 2.0}))
        state.finish(out, "f", ["train.jsonl"], {})
    summary = injob.merge_shards(shards, tmp_path / "merged", min_success_ratio=0.7)
    assert summary == {"shards": 3, "kept": 13, "rejected": 0}
    merged = [json.loads(line) for line in (tmp_path / "merged" / "train.jsonl").read_text().splitlines()]
    assert merged == train  # input order kept
    assert json.loads((tmp_path / "merged" / "stats.json").read_text())["splits"]["train"]["kept"] == 3
    assert (tmp_path / "merged" / state.DONE_FILE).is_file()  # finetune accepts it as a finished synthesize stage


def test_an_unfinished_shard_fails_the_merge(tmp_path):
    (tmp_path / "shards" / "shard-00000").mkdir(parents=True)
    with pytest.raises(StageFailed, match="shard-00000 did not finish"):
        injob.merge_shards(tmp_path / "shards", tmp_path / "merged", 0.7)


def test_the_teacher_key_reaches_only_the_stage_process(tmp_path, monkeypatch, capfd):
    key = "sk-from-the-workspace-connection-123456"
    monkeypatch.setenv("AZDISTILL_TEACHER_CONNECTION", "teacher-endpoint")
    monkeypatch.delenv("AZDISTILL_TEACHER_KEY", raising=False)
    asked = []
    connections = SimpleNamespace(get=lambda name, populate_secrets: (asked.append((name, populate_secrets)), SimpleNamespace(api_key=key))[1])
    client = SimpleNamespace(connections=connections)
    probe = "import os, hashlib; print(hashlib.sha256(os.environ['AZDISTILL_TEACHER_KEY'].encode()).hexdigest())"
    code = injob.run_with_teacher_key([sys.executable, "-c", probe], client_factory=lambda: (client, object()))
    assert code == 0 and asked == [("teacher-endpoint", True)]
    import hashlib

    output = capfd.readouterr().out
    assert hashlib.sha256(key.encode()).hexdigest() in output and key not in output
    assert "AZDISTILL_TEACHER_KEY" not in __import__("os").environ


def test_the_teacher_key_from_key_vault_uses_the_jobs_token(monkeypatch):
    import responses

    monkeypatch.delenv("AZDISTILL_TEACHER_CONNECTION", raising=False)
    monkeypatch.setenv("AZDISTILL_TEACHER_KEY_SECRET", "https://kv-distill.vault.azure.net/secrets/teacher-key")
    from azure_wire import FakeCredential

    credential = FakeCredential()
    with responses.RequestsMock() as mock:
        mock.get("https://kv-distill.vault.azure.net/secrets/teacher-key", json={"value": "sk-vault-key"})
        assert injob.teacher_key(client_factory=lambda: (None, credential)) == "sk-vault-key"
        assert mock.calls[0].request.headers["Authorization"].startswith("Bearer ")
    assert credential.scopes == ["https://vault.azure.net/.default"]


class FakeModels:
    """The registry: versions with tags, as azure-ai-ml's Model objects carry them."""

    def __init__(self, existing):
        self.versions = {str(model.version): model for model in existing}
        self.updates = []

    def create_or_update(self, model):
        if model.version is None:
            model.version = str(len(self.versions) + 1)
        self.versions[str(model.version)] = model
        self.updates.append((str(model.version), dict(model.tags)))
        return model

    def list(self, name):
        return list(self.versions.values())


def write_report(path: Path, agreement: float, promote: bool = True) -> Path:
    report = {
        "pipeline": "p", "task": "nli", "data_version": "v", "created": "now", "primary_metric": "accuracy", "promote": promote,
        "models": [{"role": "student", "name": "s", "path": "m", "parameters": 10, "size_on_disk_mb": 1, "weights_memory_mb": 1,
                    "peak_memory_mb": 5, "latency_p50_s": 0.1, "latency_p95_s": 0.2, "throughput_tokens_per_s": 9, "n": 4,
                    "metrics": {"agreement": agreement, "accuracy": agreement}}],
        "checks": [] if promote else [{"name": "agreement", "value": agreement, "threshold": 0.8, "comparison": ">=", "passed": False}],
        "device": "cpu", "samples": [],
    }
    path.write_text(json.dumps(report))
    return path


@pytest.mark.parametrize(("agreement", "promoted"), [(0.91, True), (0.85, False)])
def test_register_tags_lineage_and_promotes_only_a_better_student(tmp_path, agreement, promoted):
    pytest.importorskip("azdistill.tracking.registry")
    from azure.ai.ml.entities import Model

    champion = Model(name="s-student", version="1", path="azureml://x", tags={"azdistill.champion": "true", "metric.agreement": "0.9000"})
    models = FakeModels([champion])
    client = SimpleNamespace(models=models)
    (tmp_path / "data.json").write_text(json.dumps({"version": "s-train:7"}))
    result = injob.register_student(
        tmp_path, write_report(tmp_path / "report.json", agreement), tmp_path / "data.json", "s-student", "llama-405b",
        "agreement", "champion_challenger", tmp_path / "out", client_factory=lambda: (client, None),
    )
    assert result["version"] == "2" and result["promoted"] is promoted
    tags = models.versions["2"].tags
    assert tags["teacher"] == "llama-405b" and tags["data_version"] == "s-train:7"
    assert tags["metric.agreement"] == f"{agreement:.4f}" and tags["azdistill.champion"] == str(promoted).lower()
    assert models.versions["1"].tags["azdistill.champion"] == ("false" if promoted else "true")
    assert json.loads((tmp_path / "out" / "decision.json").read_text())["promoted"] is promoted
