"""Great Expectations (1.x) checks on the prepared clips' manifest, run through a checkpoint.

The suite states what every later stage assumes of `data/clips/manifest.csv`: one row per unique
clip, every clip at one of the `data.clip_frames` lengths, the rate and one of the `data.aspects` sizes, known splits and attribute words, a
ground-truth caption exactly where training may see it, and sane pixel statistics.
Great Expectations is imported inside the functions: importing it takes ~5 s.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from components import world
from components.checkpoint import atomic_write_json
from components.clips import SPLITS
from components.config import DataConfig

SUITE = "manifest"


class ValidationFailed(RuntimeError):
    """The manifest broke at least one expectation; the message lists each one."""


def build_suite(cfg: DataConfig) -> Any:
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    import great_expectations.expectations as gxe
    from great_expectations.expectations.row_conditions import Column

    visible, hidden = Column("caption_visible") == True, Column("caption_visible") == False  # noqa: E712
    # Far above any real caption (two objects' included).
    longest = max(len(w) for w in world.ATTRIBUTES["motion"]) * 24
    expectations = [
        gxe.ExpectTableRowCountToBeBetween(min_value=1),
        gxe.ExpectColumnValuesToNotBeNull(column="clip_id"),
        gxe.ExpectColumnValuesToBeUnique(column="clip_id"),
        gxe.ExpectCompoundColumnsToBeUnique(column_list=["shard", "index"]),
        # Variable durations: each clip at one of the `data.clip_frames` lengths (1 + 4k, at most data.frames).
        gxe.ExpectColumnValuesToBeInSet(column="frames", value_set=cfg.clip_lengths),
        # Native sizes: each clip at one of the `data.aspects` sizes (height and width as a pair).
        gxe.ExpectColumnPairValuesToBeInSet(column_A="height", column_B="width",
                                            value_pairs_set=[tuple(s) for s in cfg.clip_sizes]),
        gxe.ExpectColumnValuesToBeInSet(column="fps", value_set=[cfg.fps]),
        gxe.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS)),
        gxe.ExpectColumnDistinctValuesToContainSet(column="split", value_set=["train"]),
        gxe.ExpectColumnValuesToBeInSet(column="caption_visible", value_set=[True, False]),
        # A caption where (and only where) training may see it; never on a held-out clip.
        gxe.ExpectColumnValuesToNotBeNull(column="caption", row_condition=visible),
        gxe.ExpectColumnValuesToBeNull(column="caption", row_condition=hidden),
        gxe.ExpectColumnValueLengthsToBeBetween(column="caption", min_value=20, max_value=longest,
                                                row_condition=visible),
        gxe.ExpectColumnValuesToBeInSet(column="split", value_set=["train", "val"], row_condition=visible),
        *(gxe.ExpectColumnValuesToBeInSet(column=name, value_set=list(values))
          for name, values in world.ATTRIBUTES.items()),
        # The second object's columns (empty on one-object clips and on your own videos).
        gxe.ExpectColumnValuesToBeInSet(column="objects", value_set=[1, 2]),
        *(gxe.ExpectColumnValuesToBeInSet(column=name + world.SECOND_SUFFIX, value_set=list(world.ATTRIBUTES[name]))
          for name in world.OBJECT_ATTRIBUTES),
        gxe.ExpectColumnValuesToBeBetween(column="mean", min_value=0.0, max_value=1.0),
        gxe.ExpectColumnValuesToBeBetween(column="std", min_value=0.0, max_value=0.5),
        gxe.ExpectColumnValuesToBeBetween(column="motion_score", min_value=0.0, max_value=0.5),
        # Blank or frozen videos: every synthetic clip shows an object on a background.
        gxe.ExpectColumnValuesToBeBetween(column="std", min_value=0.005, mostly=0.99),
    ]
    suite = gx.ExpectationSuite(name=SUITE)
    for e in expectations:
        suite.add_expectation(e)
    return suite


def _condition(kwargs: dict) -> str:
    """A row condition as text: results carry it as a dict, e.g. 'caption_visible == True'."""
    rc = kwargs.get("row_condition")
    if isinstance(rc, dict) and "operator" in rc:
        return f"{rc['column']['name']} {rc['operator']} {rc['parameter']}"
    return str(rc) if rc else ""


def _describe(result: Any) -> str:
    cfg = result.expectation_config
    kwargs = {k: v for k, v in cfg.kwargs.items() if k not in ("batch_id", "row_condition")}
    column = kwargs.pop("column", None) or kwargs.pop("column_list", None)
    if column is None and "column_A" in kwargs:
        column = f"({kwargs.pop('column_A')}, {kwargs.pop('column_B')})"
    observed = result.result.get("observed_value")
    if observed is None:
        observed = {
            "unexpected_count": result.result.get("unexpected_count"),
            "unexpected_values": result.result.get("partial_unexpected_list", [])[:5],
        }
    where = f" where {_condition(cfg.kwargs)}" if cfg.kwargs.get("row_condition") else ""
    return f"{cfg.type} on {column}{where} {kwargs}: observed {observed}"


def validate_manifest(manifest_csv: Path, cfg: DataConfig, out_dir: Path, data_docs: bool = True) -> dict:
    """Run the suite over the manifest; write `validation.json` (and Data Docs); raise on failure."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    import pandas as pd
    from great_expectations.data_context.types.base import ProgressBarsConfig

    t0 = time.time()
    manifest_csv, out_dir = Path(manifest_csv), Path(out_dir)
    if not manifest_csv.exists():
        raise FileNotFoundError(f"{manifest_csv} not found: run the prepare stage first")
    df = pd.read_csv(manifest_csv, dtype={"clip_id": str, "caption": str})

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    actions = []
    if data_docs:
        context.add_data_docs_site("local", {
            "class_name": "SiteBuilder",
            "store_backend": {"class_name": "TupleFilesystemStoreBackend",
                              "base_directory": str((out_dir / "data_docs").resolve())},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        })
        actions.append(gx.checkpoint.UpdateDataDocsAction(name="data_docs", site_names=["local"]))
    batch = (context.data_sources.add_pandas("clips")
             .add_dataframe_asset(name="manifest")
             .add_batch_definition_whole_dataframe("all"))
    suite = context.suites.add(build_suite(cfg))
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name="manifest", data=batch, suite=suite))
    checkpoint = context.checkpoints.add(gx.Checkpoint(
        name="prepare", validation_definitions=[definition], actions=actions,
        result_format={"result_format": "SUMMARY"}))
    run = checkpoint.run(batch_parameters={"dataframe": df})

    results = [r for v in run.run_results.values() for r in v.results]
    report = {
        "success": bool(run.success),
        "rows": len(df),
        "evaluated": len(results),
        "failed": sum(not r.success for r in results),
        "seconds": round(time.time() - t0, 2),
        "expectations": [
            {"expectation": r.expectation_config.type,
             "kwargs": {k: _condition(r.expectation_config.kwargs) if k == "row_condition" else v
                        for k, v in r.expectation_config.kwargs.items() if k != "batch_id"},
             "success": bool(r.success),
             "observed": json.loads(json.dumps(r.result.get("observed_value",
                                                             r.result.get("unexpected_count")),
                                               default=str))}
            for r in results
        ],
    }
    atomic_write_json(out_dir / "validation.json", report)
    failed = [_describe(r) for r in results if not r.success]
    if failed:
        raise ValidationFailed(
            f"{manifest_csv} failed {len(failed)} of {len(results)} expectations "
            f"(see {out_dir / 'validation.json'}):\n  - " + "\n  - ".join(failed)
        )
    return {k: report[k] for k in ("success", "rows", "evaluated", "failed", "seconds")}
