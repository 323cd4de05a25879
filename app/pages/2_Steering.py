"""Steering: add / clamp / ablate latents, generate with and without, and measure the effect."""

import plotly.graph_objects as go
import streamlit as st
from saelab.app import common as ui

from saelab.errors import SaelabError

target = ui.setup("Steering")
hook, sae_dir = ui.pick_sae(target)
st.title("Steering")
st.caption("add α·d_i at the SAE's hook on every position, clamp a latent to a value (only the change is "
           "decoded: the SAE's error term and the other latents stay), or ablate it (clamp to 0).")
sae = ui.sae(sae_dir)
labels = ui.labels(sae_dir)

if "steer_latents" not in st.session_state:
    st.session_state["steer_latents"] = str(ui.selected_latent())
c = st.columns([2, 1, 1])
lat_text = c[0].text_input("Latents (ids, comma-separated)", key="steer_latents")
mode = c[1].radio("Mode", ["add", "clamp", "ablate"], horizontal=True, key="steer_mode")
value = c[2].number_input("α (coefficient)" if mode == "add" else "value", value=10.0, step=1.0,
                          key="steer_value", disabled=mode == "ablate")
prompt = st.text_area("Prompt", "Once upon a time there was a little", key="steer_prompt")
c = st.columns(3)
temperature = c[0].number_input("Temperature (0 = greedy)", 0.0, 5.0, 1.0, step=0.1, key="steer_temp")
seed = c[1].number_input("Seed", 0, 2**31 - 1, 0, key="steer_seed")
max_new = c[2].number_input("Max new tokens", 1, 200, 30, key="steer_max_new")

try:
    latents = [int(s) for s in lat_text.replace(",", " ").split()]
except ValueError:
    st.error(f"latents must be integer ids separated by commas, not {lat_text!r}")
    st.stop()
if latents:
    st.caption("steering " + ", ".join(ui.latent_name(j, labels) for j in latents))

if st.button("Steer", key="steer_run", type="primary"):
    from saelab.analysis.steering import Intervention, steer

    try:
        ivs = [Intervention(j, mode, float(value)) for j in latents]
        model = ui.load_model(target.model)
        with st.spinner("generating…"), ui.model_lock():
            st.session_state["steer_result"] = prompt, steer(model, sae, prompt, ivs, max_new_tokens=int(max_new),
                                                             temperature=float(temperature), seed=int(seed))
    except SaelabError as e:
        st.session_state.pop("steer_result", None)
        st.error(str(e))

if "steer_result" in st.session_state:
    used_prompt, r = st.session_state["steer_result"]
    left, right = st.columns(2)
    left.markdown("**Clean**")
    left.code(used_prompt + r.clean, language=None, wrap_lines=True)
    right.markdown("**Steered**")
    right.code(used_prompt + r.steered, language=None, wrap_lines=True)
    m = r.metrics
    c = st.columns(3)
    c[0].metric("KL(steered ‖ clean), mean over the prompt", f"{m['kl']:.3f}")
    shift = m["logit_shift"]
    c[1].metric("logit shift of promoted tokens", "—" if shift != shift else f"{shift:+.3f}",
                help=None if shift == shift else "no promoted tokens: the SAE's hook has no direct path to the logits")
    c[2].metric("fluency: clean loss on steered text", f"{m['fluency']:.3f}",
                delta=f"{m['fluency'] - m['fluency_clean']:+.3f} vs clean text", delta_color="inverse")
    if m["promoted"]:
        st.caption("promoted tokens: " + " ".join(repr(t) for t in m["promoted"]))
    pc = r.prob_change
    fig = go.Figure(go.Bar(x=[repr(p["token"]) for p in pc], y=[p["delta"] for p in pc],
                           marker_color=["darkorange" if p["delta"] > 0 else "steelblue" for p in pc],
                           customdata=[[p["p_clean"], p["p_steered"]] for p in pc],
                           hovertemplate="%{x}: %{customdata[0]:.3f} → %{customdata[1]:.3f}<extra></extra>"))
    fig.update_layout(title="change in next-token probability after the prompt", height=320,
                      margin=dict(l=10, r=10, t=40, b=10), yaxis_title="p(steered) − p(clean)")
    fig.update_xaxes(type="category")
    st.plotly_chart(fig, key="prob_change")

st.divider()
st.subheader("Sweep")
st.caption("one latent over several coefficients (greedy): where steering starts to work (KL, logit shift) "
           "and where it breaks fluency")
c = st.columns([1, 2, 1])
first = latents[0] if latents and 0 <= latents[0] < sae.d_sae else 0
sweep_latent = c[0].number_input("Latent", 0, sae.d_sae - 1, first, key="sweep_latent")
coef_text = c[1].text_input("Coefficients", "0, 2, 5, 10, 20, 40", key="sweep_coefs")
sweep_mode = c[2].radio("Mode", ["add", "clamp"], horizontal=True, key="sweep_mode")
if st.button("Run sweep", key="sweep_run"):
    from saelab.analysis.steering import sweep

    try:
        coefs = [float(s) for s in coef_text.replace(",", " ").split()]
        model = ui.load_model(target.model)
        with st.spinner("sweeping…"), ui.model_lock():
            st.session_state["sweep_rows"] = sweep(int(sweep_latent), coefs, model=model,
                                                   sae=sae, prompt=prompt, mode=sweep_mode,
                                                   max_new_tokens=min(int(max_new), 20))
    except ValueError:
        st.error(f"coefficients must be numbers separated by commas, not {coef_text!r}")
    except SaelabError as e:
        st.error(str(e))
rows = st.session_state.get("sweep_rows")
if rows:
    x = [r_["coefficient"] for r_ in rows]
    fig = go.Figure()
    for k, name in [("kl", "KL(steered ‖ clean)"), ("logit_shift", "logit shift (promoted)"),
                    ("fluency", "fluency (clean loss on steered text)")]:
        fig.add_trace(go.Scatter(x=x, y=[r_[k] for r_ in rows], mode="lines+markers", name=name))
    fig.update_layout(height=340, margin=dict(l=10, r=10, t=30, b=10), xaxis_title="coefficient")
    st.plotly_chart(fig, key="sweep_curve")
    st.dataframe(rows, hide_index=True)
