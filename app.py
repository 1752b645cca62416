"""moeviz — Streamlit entry point. `make run` starts it on localhost with the bundled demo MoE.

The pages under pages/ are thin: they describe the UI and call the `moeviz` library.
"""

import streamlit as st

from moeviz import runtime_config
from pages._state import init_session, restore_from_url, sync_url

runtime_config.configure()  # the process-wide settings (allocator, loader reads, kernels): once, idempotent

st.set_page_config(page_title="moeviz", page_icon="🧩", layout="wide")
init_session()
restore_from_url()  # once per browser session: a refresh or a shared link brings its state back
sync_url()

pages = [
    st.Page("pages/1_model_and_calibration.py", title="Model & calibration", icon="📦", default=True),
    st.Page("pages/2_routing.py", title="Routing", icon="🔀"),
    st.Page("pages/3_architecture.py", title="Architecture", icon="🧱"),
    st.Page("pages/4_compress.py", title="Compress", icon="✂️"),
    st.Page("pages/5_tradeoffs.py", title="Trade-offs", icon="📈"),
    st.Page("pages/6_export.py", title="Export", icon="💾"),
    st.Page("pages/7_sensitivity.py", title="Sensitivity", icon="🎯"),
]
st.navigation(pages).run()
