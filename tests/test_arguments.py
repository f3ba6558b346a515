"""DistillationArguments read the same from the command line, a dict (YAML/JSON) and Python."""

import pytest
from transformers import HfArgumentParser

from hf_kd import DistillationArguments

SPEC = [{"name": "kl", "temperature": 2.0},
        {"name": "jsd", "beta": 0.2, "weight": {"schedule": "linear", "start": 0.0, "end": 1.0}}]


def test_command_line_dict_and_python_agree(tmp_path):
    import json

    parser = HfArgumentParser((DistillationArguments,))
    (cli,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--distillers", json.dumps(SPEC), "--hard_label_weight", "0.5",
         "--teacher_dtype", "bfloat16", "--teacher_eval_metrics", "true", "--loss_chunk_size", "256",
         "--fused_lm_loss", "false", "--report_to", "none"]
    )
    (from_dict,) = parser.parse_dict(
        {"output_dir": str(tmp_path), "distillers": SPEC, "hard_label_weight": 0.5, "teacher_dtype": "bfloat16",
         "teacher_eval_metrics": True, "loss_chunk_size": 256, "fused_lm_loss": False, "report_to": "none"}
    )
    python = DistillationArguments(
        output_dir=str(tmp_path), distillers=SPEC, hard_label_weight=0.5, teacher_dtype="bfloat16",
        teacher_eval_metrics=True, loss_chunk_size=256, fused_lm_loss=False, report_to="none",
    )
    for args in (cli, from_dict, python):
        assert args.distillers == SPEC
        assert (args.hard_label_weight, args.teacher_dtype, args.teacher_eval_metrics) == (0.5, "bfloat16", True)
        assert (args.loss_chunk_size, args.fused_lm_loss) == (256, False)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"distillers": "[{'name': 'kl'"}, "`distillers` must be a JSON list"),
        ({"hard_label_weight": -0.1}, "`hard_label_weight` must be >= 0"),
        ({"loss_chunk_size": 0}, "`loss_chunk_size` must be a positive"),
        ({"teacher_dtype": "float64"}, "`teacher_dtype` must be one of"),
    ],
)
def test_bad_values_are_rejected_with_the_setting_named(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        DistillationArguments(output_dir=str(tmp_path), **overrides)
