"""Hub round trips, offline: push_to_hub intercepted at huggingface_hub's HfApi, loading by repo id from a
pre-filled HF cache with HF_HUB_OFFLINE=1, and the model card."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml
from helpers import inputs_for, tiny_llama
from huggingface_hub import HfApi

from hf_roast import RoastConfig, RoastModel, get_roast_model
from hf_roast.checkpoint.card import template_path

REPO = "someone/tiny-llama-roast"


def _roast(**kw):
    return get_roast_model(tiny_llama(), RoastConfig(compression=4.0, tile=(16, 16), **kw))


def _read_folder(folder) -> dict[str, bytes]:
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, folder)] = f.read()
    return files


def _front_matter(readme: str) -> dict:
    assert readme.startswith("---\n")
    return yaml.safe_load(readme.split("---\n")[1])


@pytest.fixture
def fake_hub(monkeypatch):
    """Record what would reach the Hub; nothing leaves the machine."""
    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = {"repo_id": repo_id, "token": self.token, **kwargs}

        class Url(str):
            pass

        url = Url(f"https://huggingface.co/{repo_id}")
        url.repo_id = repo_id
        return url

    def create_branch(self, repo_id, branch, **kwargs):
        calls["create_branch"] = {"repo_id": repo_id, "branch": branch, **kwargs}

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        calls["upload_folder"] = {"repo_id": repo_id, "token": self.token, **kwargs}
        calls["files"] = _read_folder(folder_path)
        return "commit-info"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_branch", create_branch)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


def test_push_to_hub_uploads_exactly_what_save_pretrained_writes(tmp_path, fake_hub):
    rm = _roast()
    result = rm.push_to_hub(REPO, token="hf_secret", revision="v1", commit_message="compressed", private=True)
    assert result == "commit-info"
    assert fake_hub["create_repo"]["repo_id"] == REPO and fake_hub["create_repo"]["private"] is True
    assert (
        fake_hub["create_repo"]["token"] == "hf_secret" and fake_hub["upload_folder"]["token"] == "hf_secret"
    )
    assert fake_hub["create_branch"]["branch"] == "v1"
    assert fake_hub["upload_folder"]["revision"] == "v1"
    assert fake_hub["upload_folder"]["commit_message"] == "compressed"
    rm.save_pretrained(tmp_path / "local", repo_id=REPO)
    assert fake_hub["files"] == _read_folder(tmp_path / "local")
    assert {"README.md", "config.json", "model.safetensors", "roast_config.json"} <= set(fake_hub["files"])
    card = fake_hub["files"]["README.md"].decode()
    assert f'from_pretrained("{REPO}")' in card and "import hf_roast" in card
    assert "hf-roast" in _front_matter(card)["tags"]


def test_model_card_metadata_and_compression_table(tmp_path):
    rm = _roast()
    rm.save_pretrained(tmp_path, base_model="org/tiny-llama", license="apache-2.0")
    card = (tmp_path / "README.md").read_text()
    meta = _front_matter(card)
    assert meta["library_name"] == "transformers"
    assert meta["base_model"] == "org/tiny-llama"
    assert meta["base_model_relation"] == "quantized"
    assert meta["tags"] == ["hf-roast", "roast"]
    assert meta["license"] == "apache-2.0"
    report = rm.compression_report()
    assert (
        f"| compressed modules: parameters | {report['target']['dense_parameters']:,} | "
        f"{report['target']['stored_parameters']:,} |" in card
    )
    assert f"{report['target']['ratio']:.2f}x" in card
    assert "| mapper | `stable` |" in card and "| tile | 16 x 16 |" in card and "| seed | 0 |" in card
    assert "AutoModelForCausalLM.from_pretrained" in card


def test_model_card_without_base_model_or_license_omits_them(tmp_path):
    _roast().save_pretrained(tmp_path)
    meta = _front_matter((tmp_path / "README.md").read_text())
    assert "base_model" not in meta and "base_model_relation" not in meta and "license" not in meta


def test_base_model_is_taken_from_a_hub_name_or_path(tmp_path):
    rm = _roast()
    rm.config._name_or_path = "org/base-from-hub"
    rm.save_pretrained(tmp_path)
    assert _front_matter((tmp_path / "README.md").read_text())["base_model"] == "org/base-from-hub"


def test_template_is_package_data():
    assert template_path().endswith(os.path.join("model_cards", "roast_model_card.jinja"))


def test_from_pretrained_passes_revision_and_token_to_huggingface_hub(tmp_path, monkeypatch):
    import huggingface_hub

    rm = _roast()
    rm.save_pretrained(tmp_path / "snap")
    seen = {}

    def snapshot_download(repo_id, **kwargs):
        seen.update(repo_id=repo_id, **kwargs)
        return str(tmp_path / "snap")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    loaded = RoastModel.from_pretrained(REPO, revision="abc123", token="hf_secret")
    assert seen["repo_id"] == REPO and seen["revision"] == "abc123" and seen["token"] == "hf_secret"
    assert "*.safetensors" in seen["allow_patterns"]
    inputs = inputs_for("llama")
    with torch.no_grad():
        assert torch.equal(rm(**inputs).logits, loaded(**inputs).logits)


def _fill_cache(cache: str, repo_id: str, folder: str, commit: str = "0" * 40) -> None:
    """The layout huggingface_hub's cache uses: refs/main -> snapshots/<commit>/<files>."""
    repo_dir = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    os.makedirs(os.path.join(repo_dir, "refs"))
    with open(os.path.join(repo_dir, "refs", "main"), "w") as f:
        f.write(commit)
    shutil.copytree(folder, os.path.join(repo_dir, "snapshots", commit))


def test_load_by_repo_id_from_prefilled_cache_offline(tmp_path):
    rm = _roast()
    rm.save_pretrained(tmp_path / "ckpt", repo_id=REPO)
    inputs = inputs_for("llama")
    with torch.no_grad():
        torch.save({"inputs": inputs, "logits": rm(**inputs).logits}, tmp_path / "expected.pt")
    cache = str(tmp_path / "hub_cache")
    _fill_cache(cache, REPO, str(tmp_path / "ckpt"))
    code = textwrap.dedent(
        f"""
        import torch, hf_roast, transformers
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        auto = transformers.AutoModelForCausalLM.from_pretrained({REPO!r})
        wrapped = hf_roast.RoastModel.from_pretrained({REPO!r}, revision="main")
        with torch.no_grad():
            for model in (auto, wrapped):
                assert torch.equal(model(**expected["inputs"]).logits, expected["logits"])
        print("OFFLINE OK")
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": cache, "HF_HOME": str(tmp_path / "hf_home")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=180)
    assert "OFFLINE OK" in out.stdout, out.stderr[-3000:]


def test_roast_config_json_and_config_json_describe_the_same_checkpoint(tmp_path):
    _roast().save_pretrained(tmp_path)
    with open(tmp_path / "config.json") as f:
        qc = json.load(f)["quantization_config"]
    with open(tmp_path / "roast_config.json") as f:
        assert {"quant_method": "roast", **json.load(f)} == qc
