"""A finished cell's model at work: `ablate predict`, `ablate serve` (MLflow's scoring
server), `ablate demo` (a Streamlit page), and what a cell logs for them and for the report.

Modules: ``classifier`` (the one way a cell's weights become a classifier of raw images),
``record`` (what a finished cell logs: preprocessing facts, held-out predictions, the
MLflow model), ``pyfunc_model`` (the MLflow "model from code" file), ``runs`` (which run an
ablation, arm and seed name), ``server`` (`ablate serve`), ``demo`` and ``demo_app``
(`ablate demo`), ``cli`` (the three commands).
"""
