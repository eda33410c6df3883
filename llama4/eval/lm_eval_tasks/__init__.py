"""Our offline lm-eval tasks: the YAMLs lm-eval reads with ``--include_path`` (``llama4 eval
--lm-eval-tasks`` adds this folder itself), their JSONL data (``python -m llama4.eval.lm_eval_data``)
and ``loader.py``, which the YAMLs name. A package only so that installs ship these files."""
