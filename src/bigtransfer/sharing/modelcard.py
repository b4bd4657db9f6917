"""The model card (README.md) of a pushed run: what the model is, how it was made, how to load it.

Everything in it comes from the run's own files (config.json, summary.json, final.safetensors'
metadata) and the zoo's table of released weights; nothing is estimated or filled in. What came
from a user (class names, the data's name, values in the run's files) is escaped (safe_text), so
a name can add no heading, link or HTML to the card.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..models import zoo
from ..models.hub import hub_copy
from ..models.resnetv2 import FOREIGN_WS_EPS, ArchSpec, parameter_count
from ..recipes import hyperrule
from ..safe_text import markdown_code, markdown_fence, markdown_text
from ..version import __version__

MAX_LISTED_CLASSES = 100


@dataclass
class CardFacts:
    """What the card says, gathered from the run (see push.py)."""

    repo_id: str
    arch: ArchSpec
    class_names: list[str]
    resolution: int | None
    config: dict  # the run's config.json
    summary: dict  # the run's summary.json
    run_kind: str  # finetune, pretrain, distill, ...
    timm_name: str | None  # timm's registered name, None when timm registers no such architecture
    ws_eps: float  # the trained model's weight-standardisation epsilon


def render(facts: CardFacts) -> str:
    """The README.md text, YAML front matter first (the hub reads tags and the base model there)."""
    sections = [_front_matter(facts), _title(facts), _architecture(facts), _upstream(facts), _plan(facts),
                _results(facts), _classes(facts), _loading(facts), _notes(facts)]
    return "\n\n".join(s for s in sections if s) + "\n"


def _upstream_name(facts: CardFacts) -> str | None:
    return facts.config.get("weights") or facts.config.get("model")


def _front_matter(facts: CardFacts) -> str:
    lines = ["---", "library_name: transformers", "pipeline_tag: image-classification",
             "tags:", "- image-classification", "- bit", "- big-transfer", "- bigtransfer", "- timm"]
    upstream = _upstream_name(facts)
    copy = hub_copy(upstream) if upstream else None
    if copy is not None:
        lines.append(f"base_model: {copy.repo_id}")
    lines.append("---")
    return "\n".join(lines)


def _title(facts: CardFacts) -> str:
    data = facts.config.get("data", "?")
    return (f"# {markdown_text(facts.repo_id.split('/')[-1])}\n\n"
            f"A BiT (Big Transfer, Kolesnikov et al., ECCV 2020) ResNet-v2 {facts.arch.name}, "
            f"{'fine-tuned' if facts.run_kind == 'finetune' else 'trained'} with "
            f"bigtransfer {__version__} on {markdown_code(data)} "
            f"({len(facts.class_names)} classes).")


def _architecture(facts: CardFacts) -> str:
    arch, classes = facts.arch, len(facts.class_names)
    resolution = f"{facts.resolution}x{facts.resolution}" if facts.resolution else "not recorded"
    return "\n".join([
        "## Architecture", "",
        (f"- ResNet-v2 {arch.name}: units per stage {list(arch.units)}, width x{arch.width:g}, "
         f"{parameter_count(arch, classes) / 1e6:.1f}M parameters with the {classes}-way head"),
        ("- GroupNorm (32 groups) and Weight Standardization in every convolution; pre-activation bottleneck "
         "units; a 7x7/2 root conv, zero padding and an unpadded 3x3/2 max-pool"),
        (f"- input: RGB at {resolution}, scaled to [-1, 1] (`(x / 255 - 0.5) / 0.5`); the files' "
         "preprocessor_config.json does this for transformers"),
    ])


def _upstream(facts: CardFacts) -> str:
    upstream = _upstream_name(facts)
    entry = zoo.lookup(upstream) if upstream else None
    lines = ["## Upstream weights", ""]
    if entry is not None:
        copy = hub_copy(entry.name)
        lines.append(f"- `{entry.name}`: {entry.description} ({entry.arch_name}, {entry.num_classes}-way head), "
                     f"the authors' release" + (f"; on the hub as `{copy.repo_id}`" if copy else ""))
    elif upstream:
        lines.append(f"- {markdown_code(upstream)} (not one of the authors' released files)")
    else:
        lines.append("- none recorded: trained from a random initialisation")
    return "\n".join(lines)


def _plan(facts: CardFacts) -> str:
    plan = facts.config.get("plan")
    if plan is None:
        return "## Training plan\n\nThe run's config.json records no plan."
    if facts.run_kind == "finetune":
        described = hyperrule.describe(hyperrule.Plan.from_dict(plan))
        title = "## Fine-tuning: the BiT-HyperRule plan used"
    else:
        described = json.dumps(plan, indent=2)
        title = f"## Training plan ({facts.run_kind})"
    settings = {k: facts.config.get(k) for k in ("examples_per_class", "seed", "freeze_until", "linear_probe")
                if facts.config.get(k) not in (None, False)}
    extra = f"\n\nAlso: {', '.join(markdown_text(f'{k}={v}') for k, v in settings.items())}." if settings else ""
    return f"{title}\n\nFrom the run's config.json:\n\n{markdown_fence(described)}{extra}"


def _results(facts: CardFacts) -> str:
    final = facts.summary.get("final") or {}
    if not final:
        return "## Results\n\nThe run's summary.json records no final metrics."
    rows = ["| metric | value |", "|---|---|"]
    for key, value in final.items():
        shown = f"{value:.2%}" if key.startswith("top") and isinstance(value, float) else (
            f"{value:.4f}" if isinstance(value, float) else str(value))
        rows.append(f"| {markdown_text(key)} | {markdown_text(shown)} |")
    counts = [f"{facts.summary[k]} {k.replace('_', ' ')}" for k in ("train_examples", "test_examples", "steps")
              if k in facts.summary]
    return ("## Results\n\nOn the held-out split at the end of training (the run's summary.json"
            + (f"; {', '.join(counts)}" if counts else "") + "):\n\n" + "\n".join(rows))


def _classes(facts: CardFacts) -> str:
    names = facts.class_names
    shown = ", ".join(markdown_code(n) for n in names[:MAX_LISTED_CLASSES])
    more = f", ... ({len(names) - MAX_LISTED_CLASSES} more: config.json's id2label has all)" \
        if len(names) > MAX_LISTED_CLASSES else ""
    return f"## Classes\n\n{len(names)} classes, in the head's order: {shown}{more}."


def _loading(facts: CardFacts) -> str:
    repo, classes, size = facts.repo_id, len(facts.class_names), facts.resolution or 224
    parts = ["## How to load it", "",
             "**bigtransfer** (it reads this folder as a transformers checkpoint, class names included):", "",
             "```bash",
             f"hf download {repo} --local-dir {repo.split('/')[-1]}",
             f"bigtransfer predict --model {repo.split('/')[-1]} photo.jpg", "```", "",
             "```python", "import bigtransfer, huggingface_hub",
             f"folder = huggingface_hub.snapshot_download({repo!r})",
             f"model = bigtransfer.create_model({facts.arch.name!r}, weights=folder).eval()",
             f"logits = model(images)  # images: [N, 3, {size}, {size}] RGB in [-1, 1]", "```", "",
             "**transformers**:", "",
             "```python", "from transformers import AutoImageProcessor, BitForImageClassification",
             f"model = BitForImageClassification.from_pretrained({repo!r}).eval()",
             f"processor = AutoImageProcessor.from_pretrained({repo!r})",
             "logits = model(**processor(image, return_tensors='pt')).logits",
             "print(model.config.id2label[int(logits.argmax())])", "```"]
    if facts.timm_name is not None:
        parts += ["", ("**timm** (the state dict in `timm/`; the class count goes into the overlay too, or timm "
                   "drops the head):"), "",
                  "```python", "import timm, huggingface_hub",
                  f"path = huggingface_hub.hf_hub_download({repo!r}, 'timm/model.safetensors')",
                  f"model = timm.create_model({facts.timm_name!r}, pretrained=True, num_classes={classes},",
                  f"                          pretrained_cfg_overlay=dict(file=path, num_classes={classes})).eval()",
                  "```"]
    else:
        parts += ["", (f"timm registers BiT only at the released sizes; {facts.arch.name} is not one, so there is no "
                   "timm copy here.")]
    return "\n".join(parts)


def _notes(facts: CardFacts) -> str:
    if facts.ws_eps == FOREIGN_WS_EPS:
        eps = "the trained model already uses timm's and transformers' weight-standardisation epsilon (1e-8)"
    else:
        eps = (f"the kernels in these files are the trained ones times {(FOREIGN_WS_EPS / facts.ws_eps) ** 0.5:g}, "
               f"so that timm's and transformers' weight-standardisation epsilon (1e-8) computes exactly what "
               f"the trained model computed with its {facts.ws_eps:g} (standardisation ignores a kernel's scale "
               f"but for epsilon)")
    fingerprint = facts.config.get("fingerprint")
    return "\n".join(["## Notes", "",
                      f"- Written by `bigtransfer push` ({__version__}) from a {facts.run_kind} run"
                      + (f" (fingerprint {markdown_code(fingerprint)})" if fingerprint else "") + ".",
                      f"- The same function in every format here: {eps}."])
