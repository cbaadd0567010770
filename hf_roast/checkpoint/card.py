"""The README.md (model card) written next to every checkpoint, from ``model_cards/roast_model_card.jinja``.

The card's YAML metadata is what the Hub indexes: ``library_name``, ``base_model`` with
``base_model_relation: quantized`` (so the Hub lists the checkpoint under its base model's
quantizations), the ``hf-roast`` / ``roast`` tags and the license when known. The body holds the
compression table and a loading snippet that includes the required ``import hf_roast``.
"""

from __future__ import annotations

import os
import re
from importlib import resources

import yaml
from huggingface_hub import ModelCard, ModelCardData

TEMPLATE_NAME = "roast_model_card.jinja"
TAGS = ["hf-roast", "roast"]
LIBRARY_NAME = "transformers"
"""The Hub library: loading is transformers-native (``AutoModel*`` after ``import hf_roast``)."""

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

_AUTO_CLASSES = (
    ("AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
    ("AutoModelForSeq2SeqLM", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES"),
    ("AutoModelForSequenceClassification", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"),
    ("AutoModelForTokenClassification", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES"),
    ("AutoModelForQuestionAnswering", "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES"),
    ("AutoModelForMaskedLM", "MODEL_FOR_MASKED_LM_MAPPING_NAMES"),
    ("AutoModelForImageClassification", "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES"),
    ("AutoModel", "MODEL_MAPPING_NAMES"),
)


def template_path() -> str:
    """The template shipped as package data of ``hf_roast.model_cards`` (works from a wheel too)."""
    path = resources.files("hf_roast.model_cards").joinpath(TEMPLATE_NAME)
    if not path.is_file():
        raise FileNotFoundError(
            f"hf_roast's model card template {TEMPLATE_NAME} is missing: reinstall hf-roast."
        )
    return str(path)


def auto_class_name(architecture: str) -> str:
    """The Auto class that builds ``architecture`` (e.g. LlamaForCausalLM -> AutoModelForCausalLM)."""
    from transformers.models.auto import modeling_auto

    for auto_name, mapping_name in _AUTO_CLASSES:
        mapping = getattr(modeling_auto, mapping_name, {})
        if any(architecture == v or (isinstance(v, tuple) and architecture in v) for v in mapping.values()):
            return auto_name
    return architecture


def guess_base_model(base) -> str | None:
    """The Hub repo the dense model came from, when its config says so and it is not a local folder."""
    name = getattr(getattr(base, "config", None), "_name_or_path", None) or getattr(
        getattr(base, "config", None), "name_or_path", None
    )
    if isinstance(name, str) and _REPO_ID.match(name) and not os.path.exists(name):
        return name
    return None


def render_model_card(
    model,
    repo_id: str | None = None,
    base_model: str | None = None,
    license: str | None = None,
    model_name: str | None = None,
    recovery: dict | None = None,
) -> ModelCard:
    """The card of the compressed HF ``model`` (a RoastModel's ``base_model``); ``base_model`` is guessed from
    the config when not given. ``recovery``: the record of a recovery run, stated in one line of the card."""
    from ..report import compression_report

    base = model
    base_model = base_model or guess_base_model(base)
    report = compression_report(base)
    architecture = (getattr(base.config, "architectures", None) or [type(base).__name__])[0]
    card_data = ModelCardData(
        library_name=LIBRARY_NAME,
        base_model=base_model,
        license=license,
        tags=list(TAGS),
    )
    if base_model:
        card_data.base_model_relation = "quantized"
    if model_name is None:
        if repo_id:
            model_name = repo_id.rstrip("/").split("/")[-1]
        elif base_model:
            model_name = base_model.split("/")[-1] + "-roast"
        else:
            model_name = f"{architecture} (ROAST-compressed)"
    return ModelCard.from_template(
        card_data,
        template_path=template_path(),
        model_name=model_name,
        base_model=base_model,
        report=report,
        auto_class=auto_class_name(architecture),
        repo_id=repo_id or "path/to/checkpoint",
        recovery=recovery,
    )


def write_model_card(model, save_directory: str | os.PathLike, repo_id: str | None = None, **kwargs) -> str:
    """Write ``README.md`` into ``save_directory``; returns its path."""
    card = render_model_card(model, repo_id=repo_id or os.fspath(save_directory), **kwargs)
    path = os.path.join(save_directory, "README.md")
    card.save(path)
    return path


def read_card_metadata(model_dir: str | os.PathLike) -> dict:
    """The YAML metadata of a dense model folder's README.md (license, base model...), or {}."""
    path = os.path.join(model_dir, "README.md")
    if not os.path.isfile(path):
        return {}
    try:
        return ModelCard.load(path).data.to_dict()
    except (ValueError, yaml.YAMLError):  # a hand-written README with broken metadata is no reason to stop
        return {}
