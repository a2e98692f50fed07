"""The `ablate demo` page, a Streamlit script (``streamlit run demo_app.py -- SPEC``): drop
an image, see each arm's top-5 side by side, one row per ablation.

SPEC (JSON, from ``demo.demo_command``): the store and, per ablation, the runs of its arms.
Each arm's classifier is loaded once per server (``st.cache_resource``) by the same code as
`ablate predict` (``runs.load_run_classifier``).
"""

from __future__ import annotations

import json
import sys

import streamlit as st
import torch

from alexnet.errors import AblateError
from alexnet.serving.classifier import Classifier, decode_image
from alexnet.serving.runs import load_run_classifier

SPEC = json.loads(sys.argv[1])


@st.cache_resource(show_spinner="loading the arms' models")
def classifier(uri: str, source_id: str) -> Classifier:
    return load_run_classifier(uri, source_id)


def show_arm(arm: dict, data: bytes, name: str) -> None:
    st.markdown(f"**{arm['label']}**  \nseed {arm['seed']} · run `{arm['run_id'][:8]}`")
    try:
        model = classifier(SPEC["uri"], arm["source_id"])
        prediction = model.predict(torch.stack([model.read(data, name)]))[0]
    except AblateError as err:
        st.error(str(err))
        return
    for rank, (label, p) in enumerate(prediction.top, 1):
        st.progress(min(max(p, 0.0), 1.0), text=f"{rank}. {label} — {100 * p:.1f}%")


st.set_page_config(page_title="alexnet-ablate demo", layout="wide")
st.title("What each arm sees")
st.caption("Drop an image of the size the models were trained on (32×32 for the CIFAR "
           "nets); each arm's top-5 classes appear side by side, one row per ablation.")
upload = st.file_uploader("Image", type=["png", "jpg", "jpeg", "bmp", "webp", "gif"])
if upload is None:
    for group in SPEC["groups"]:
        st.markdown(f"- **{group['ablation']}**: "
                    + ", ".join(arm["label"] for arm in group["arms"]))
else:
    data = upload.getvalue()
    try:
        st.image(decode_image(data, upload.name).permute(1, 2, 0).numpy(), width=128,
                 caption=upload.name)
    except AblateError as err:
        st.error(str(err))
        st.stop()
    for group in SPEC["groups"]:
        st.subheader(group["ablation"])
        for column, arm in zip(st.columns(len(group["arms"])), group["arms"], strict=True):
            with column:
                show_arm(arm, data, upload.name)
