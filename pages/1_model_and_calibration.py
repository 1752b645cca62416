"""Page 1 — choose a model and calibration text, run one calibration pass."""

import streamlit as st

import moeviz
from moeviz.data import decode_text, documents_from_hf_dataset, documents_from_jsonl, documents_from_text
from moeviz.workspace import calibrate_cached
from pages._state import require_model, sync_url, try_load, user_errors

st.header("Model & calibration")
st.write("Pick a Mixture-of-Experts model (the bundled demo MoE works offline) and the text that shows "
         "how its router behaves. Calibration runs the text through the model once and keeps statistics "
         "that every other page uses.")

s = st.session_state
DTYPES = ["auto", "float32", "bfloat16", "float16"]
# The form's widgets are keyed and filled from the session when the loaded source changes (here or from
# a link). Passing value=/index= instead would give the widgets a new identity after each load, and
# the next "Load model" press would then read the old identity's defaults: the previous source again.
current = (s.model_source, s.dtype, s.device, s.trust_remote_code)
if s.get("_model_form_for") != current or any(k not in s for k in ("mf_kind", "mf_source", "mf_dtype", "mf_device",
                                                                    "mf_trust")):
    s.mf_kind = "Local folder or hub id" if s.model_source else "Bundled demo MoE"
    s.mf_source, s.mf_dtype, s.mf_device, s.mf_trust = s.model_source, s.dtype, s.device, s.trust_remote_code
    s._model_form_for = current
with st.form("model_form"):
    kind = st.radio("Model", ["Bundled demo MoE", "Local folder or hub id"], horizontal=True, key="mf_kind")
    source = st.text_input("Folder or hub id (owner/name)", key="mf_source", help="Ignored for the demo model.")
    c1, c2, c3 = st.columns(3)
    dtype = c1.selectbox("dtype", DTYPES, key="mf_dtype")
    device = c2.text_input("Device", key="mf_device", help="cpu, cuda, cuda:1, …")
    trust = c3.checkbox("trust_remote_code", key="mf_trust",
                        help="Runs code from the model's repository. Only for repositories you trust.")
    if st.form_submit_button("Load model"):
        new_source = source.strip() if kind != "Bundled demo MoE" else ""
        new = (new_source, dtype, device.strip() or "cpu", trust)
        if new != current:
            # Load before switching: a bad folder or device is refused here, once, and the working model stays.
            problem = try_load(*new)
            if problem is None:
                s.model_source, s.dtype, s.device, s.trust_remote_code = new
                s.stats, s.calibration_settings = None, None
                s._model_form_for = new
            else:
                st.error(f"{problem.rstrip('.')}. The model loaded before is kept.")
        sync_url()

lm = require_model()
info = lm.info
# The architecture name is text, not a number: a metric of its own would be cut ("Mixtral…") at 1440 px.
st.markdown(f"**Architecture** `{info.architecture}`")
cols = st.columns(5)
cols[0].metric("MoE layers", info.num_moe_layers)
cols[1].metric("Experts / layer", info.num_experts)
cols[2].metric("Top-k", info.top_k)
cols[3].metric("Parameters", f"{info.num_parameters / 1e6:.2f} M")
cols[4].metric("Expert share", f"{info.expert_parameters / info.num_parameters:.0%}",
               help="Share of the parameters that sit in the routed experts")
st.caption(f"Routing rule: {info.routing_rule} · {info.dtype} on {info.device} · fingerprint {info.fingerprint}")
if not getattr(info, "expert_removal", True):
    st.info("This router's rule matched none moeviz knows: router probabilities show only the chosen experts' "
            "weights, and expert removal is not available (pruning and quantization are).")

st.subheader("Calibration")
source_kind = st.radio("Calibration text", ["Bundled text", "Upload .txt / .jsonl", "Hugging Face dataset"],
                       horizontal=True)
documents, data_name = None, "the bundled text"
if source_kind == "Upload .txt / .jsonl":
    upload = st.file_uploader("Text file", type=["txt", "jsonl"])
    if upload is not None:
        with user_errors():  # a binary upload is refused, not decoded into garbage statistics
            text = decode_text(upload.getvalue(), upload.name)
            documents = (documents_from_jsonl(text.split("\n"), name=upload.name) if upload.name.endswith(".jsonl")
                         else documents_from_text(text, domain=upload.name.rsplit(".", 1)[0]))
        data_name = upload.name
elif source_kind == "Hugging Face dataset":
    d1, d2, d3, d4 = st.columns(4)
    ds_name = d1.text_input("Dataset name or loader", value="", help="e.g. wikitext, or 'text' with data files")
    ds_config = d2.text_input("Config", value="") or None
    ds_split = d3.text_input("Split", value="train")
    ds_column = d4.text_input("Text column", value="text")
c1, c2, c3 = st.columns(3)
# No min / max on these two: the browser would only turn an out-of-range value red and "Run calibration" would
# then run silently on the previous value. The library checks them when the button is pressed (samples ≥ 1,
# 2 ≤ sequence length ≤ the model's context) and says what to type instead.
n_samples = c1.number_input("Samples", value=64, step=1, help="At least 1; checked when you run calibration")
seq_len = c2.number_input("Sequence length (tokens)", value=min(128, lm.max_context or 128), step=1,
                          help=(f"At most the model's context ({lm.max_context} tokens)" if lm.max_context
                                else "The model states no context length") + "; checked when you run calibration")
seed = c3.number_input("Seed", min_value=0, value=0)

if st.button("Run calibration", type="primary"):
    with user_errors():
        if source_kind == "Hugging Face dataset":
            if not ds_name.strip():
                st.error("Enter a dataset name.")
                st.stop()
            documents = documents_from_hf_dataset(ds_name.strip(), ds_config, ds_split, ds_column)
            data_name = ds_name
        if source_kind == "Upload .txt / .jsonl" and documents is None:
            st.error("Upload a .txt or .jsonl file first.")
            st.stop()
        samples = moeviz.load_calibration_data(lm.tokenizer, documents, n_samples=int(n_samples),
                                               seq_len=int(seq_len), seed=int(seed), max_seq_len=lm.max_context)
        bar = st.progress(0.0, text="Calibrating…")
        stats, cached = calibrate_cached(lm, samples, progress=lambda d, t: bar.progress(d / t, text=f"Calibrating… {d}/{t} samples"))
        bar.empty()
        s.stats = stats
        s.calibration_samples = samples
        s.calibration_source = data_name
        s.calibration_settings = (dict(n_samples=int(n_samples), seq_len=int(seq_len), seed=int(seed))
                                  if source_kind == "Bundled text" else None)  # only the bundled text is restorable
        sync_url()
        st.success(("Loaded cached statistics" if cached else f"Calibrated in {stats.seconds:.1f} s")
                   + f" for {data_name}.")

stats = s.stats if s.stats is not None and s.stats.model_fingerprint == lm.fingerprint else None
if stats is not None:
    util = stats.utilization_matrix()
    cols = st.columns(5)
    cols[0].metric("Tokens seen", f"{stats.n_tokens:,}")
    cols[1].metric("Domains", len(stats.domain_names), help=", ".join(stats.domain_names))  # names: caption below
    cols[2].metric("Calibration time", f"{stats.seconds:.1f} s")
    cols[3].metric("Least-used expert", f"{float(util.min()):.1%}")
    cols[4].metric("Mean load-balance CV", f"{sum(l.load_balance_cv() for l in stats.layers) / len(stats.layers):.2f}")
    st.caption(f"Domains: {', '.join(stats.domain_names)}")
    st.page_link("pages/2_routing.py", label="See the routing", icon="🔀")
