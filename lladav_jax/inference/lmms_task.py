"""A local lmms-eval task made from `lladav-eval` rows: the same questions, prompts and scoring.

  lladav-data lmms-task --data rows.jsonl --out TASKDIR [--name NAME] [--preset PRESET]
  python -m lmms_eval --model lladav --model_args pretrained=WORKDIR --batch_size 8 \
      --tasks NAME --include_path TASKDIR

TASKDIR gets NAME.yaml, the task, and NAME.jsonl, its rows: each row's prompt as lladav-eval puts
it (`scoring.prompt_of`), its images or video as absolute paths, and the row itself for scoring.
The hooks the task names are this module's functions: `doc_to_visual` gives PIL images or a
video path (lmms-eval's convention), `process_results` scores as lladav-eval does
(`scoring.score`), and the task reports `accuracy`, the mean of those scores. The preset's
sampler settings become the task's `generation_kwargs`, in the official adapter's names. The
lmms-eval model reads every video as `video.max_frames` frames spread evenly, as the official
evaluation does and lladav-eval with `--preset videomme`.
"""

from __future__ import annotations

import json
import pathlib
import re

from lladav_jax.inference.scoring import NOT_SAMPLER, PRESETS, prompt_of, read_rows, score

# The official adapter's names for the sampler's options: the one table, which the lmms-eval
# model reads reversed (`lmms.RENAMED`).
OFFICIAL_NAMES = {"steps": "gen_steps", "cfg_scale": "cfg"}


def generation_kwargs(preset: str | None) -> dict:
    """A preset's sampler settings under the official adapter's names; none without a preset
    (then the model's defaults apply: the official 2 tokens, or `--gen_kwargs`)."""
    settings = {k: v for k, v in PRESETS.get(preset, {}).items() if k not in NOT_SAMPLER}
    return {OFFICIAL_NAMES.get(k, k): v for k, v in settings.items()}


def _yaml(name: str, data: pathlib.Path, kwargs: dict) -> str:
    # JSON is YAML: every value is written as a JSON literal.
    hooks = {k: f"!function {__name__}.{k}"
             for k in ("doc_to_visual", "doc_to_text", "process_results")}
    lines = [
        f"task: {json.dumps(name)}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {json.dumps(str(data))}",
        "test_split: test",
        "output_type: generate_until",
        *(f"{k}: {v}" for k, v in hooks.items()),
        "doc_to_target: target",
        f"generation_kwargs: {json.dumps(kwargs)}",
        "metric_list:",
        "  - metric: accuracy",
        "    aggregation: mean",
        "    higher_is_better: true",
        "metadata:",
        "  version: 0",
    ]
    return "\n".join(lines) + "\n"


def write_task(data: str | pathlib.Path, out: str | pathlib.Path, name: str | None = None,
               preset: str | None = None, metric: str | None = None) -> pathlib.Path:
    """Writes the task of the rows in `data` (checked as lladav-eval checks them) to `out`;
    returns the YAML's path. `name` defaults to the data file's stem; `metric` (exact | relaxed,
    for questions without choices) to the preset's, else exact."""
    name = name or pathlib.Path(data).stem
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name):
        raise ValueError(f"task name {name!r}: letters, digits, '_', '-' and '.' only")
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"preset {preset!r}: expected one of {sorted(PRESETS)}")
    chosen = PRESETS.get(preset, {})
    metric, style = metric or chosen.get("metric", "exact"), chosen.get("prompt", "default")
    docs = []
    for row in read_rows(data):  # bad rows fail before anything is written
        public = {k: v for k, v in row.items() if not k.startswith("_")}
        docs.append({
            "line": row["_line"],
            "prompt": prompt_of(row, style),
            "images": [str(p) for p in row["_images"]],
            "video": str(row["_video"] or ""),
            "metric": metric,
            "target": json.dumps(row["answer"], ensure_ascii=False),
            "row": json.dumps(public, ensure_ascii=False),
        })
    out = pathlib.Path(out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    rows = out / f"{name}.jsonl"
    rows.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs),
                    encoding="utf-8")
    task = out / f"{name}.yaml"
    task.write_text(_yaml(name, rows, generation_kwargs(preset)), encoding="utf-8")
    return task


# -- the task's hooks (lmms-eval calls these with one dataset row, a `doc`) -----------------------
def doc_to_visual(doc: dict) -> list:
    """PIL images, or a video's path."""
    from lladav_jax.data.image_file import load_image

    if doc["video"]:
        return [doc["video"]]
    return [load_image(p) for p in doc["images"] or []]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    return doc["prompt"]


def process_results(doc: dict, results: list[str]) -> dict:
    """`accuracy`: 1.0 if lladav-eval would count the prediction right, else 0.0."""
    return {"accuracy": float(score(json.loads(doc["row"]), results[0], doc["metric"])["correct"])}
