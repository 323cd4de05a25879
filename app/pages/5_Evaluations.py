"""Evaluations: every score that `saelab eval` wrote for the target's SAEs (and any others named here), against L0;
SAEs that differ only by their seed are one point with bars over the seeds."""

import re

import plotly.graph_objects as go
import streamlit as st
from saelab.app import common as ui

from saelab.errors import SaelabError

target = ui.setup("Evaluations")
st.title("Evaluations")
more = st.text_input("Also compare", key="eval_more",
                     placeholder="more SAE or group folders, comma-separated; globs too, e.g. runs/sweep/*")


def rows_of(extra: str):
    from saelab.analysis.scores import expand, score_rows

    return score_rows([*target.saes.values(), *expand(extra)] if extra.strip() else list(target.saes.values()))


try:
    rows = rows_of(more)
except SaelabError as e:
    st.error(str(e))
    st.stop()
if not rows:
    st.info("None of these SAEs has been evaluated yet: run "
            f"`saelab eval --sae {target.group or target.path} --model {target.model or 'MODEL'} "
            "--suite core,probing,autointerp` (and truth or stability where they apply).")
    st.stop()

from saelab.analysis.scores import metrics, settings  # noqa: E402

names = metrics(rows)
groups = settings(rows)
label = {id(r): f"{r.folder.parent.name}/{r.folder.name}" for r in rows}
table = [{"SAE": label[id(r)], "hook": r.hook, "arch": r.arch, "width": r.width, "k": r.k, "seed": r.seed,
          **{n: r.scores.get(n) for n in names}} for r in rows]
st.dataframe(table, hide_index=True)
st.caption(f"{len(rows)} SAEs in {len(groups)} settings; a setting is everything that made an SAE but its seed")

plottable = [n for n in names if n != "l0"]
default = next((n for n in ("ce_loss_recovered", "fvu") if n in plottable), plottable[0] if plottable else None)
if default is None:
    st.stop()
metric = st.selectbox("Metric", plottable, index=plottable.index(default), key="eval_metric")


def spread(values):
    """(mean, below, above): the bars reach the smallest and the largest value."""
    m = sum(values) / len(values)
    return m, m - min(values), max(values) - m


fig = go.Figure()
for arch in dict.fromkeys(r.arch for r in rows):
    xs, ys, lo, hi, xlo, xhi, text = [], [], [], [], [], [], []
    for g in groups:
        pts = [r for r in g if r.arch == arch and r.scores.get(metric) is not None and r.l0 is not None]
        if not pts:
            continue
        y, below, above = spread([r.scores[metric] for r in pts])
        x, left, right = spread([r.l0 for r in pts])
        xs.append(x)
        ys.append(y)
        lo.append(below)
        hi.append(above)
        xlo.append(left)
        xhi.append(right)
        seeds = ", ".join(str(r.seed) for r in pts)
        text.append("<br>".join(label[id(r)] for r in pts) + (f"<br>{len(pts)} seeds ({seeds})" if len(pts) > 1
                                                             else ""))
    if xs:
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="markers", name=arch, text=text, hovertemplate="%{text}<br>L0 "
                                 "%{x:.1f}<br>" + metric + " %{y:.4f}<extra></extra>", marker=dict(size=11),
                                 error_y=dict(type="data", symmetric=False, array=hi, arrayminus=lo, visible=True),
                                 error_x=dict(type="data", symmetric=False, array=xhi, arrayminus=xlo, visible=True)))
fig.update_layout(xaxis_title="L0 (mean active latents per token)", yaxis_title=metric, height=460,
                  margin=dict(l=10, r=10, t=30, b=10), legend_title_text="architecture", showlegend=True)
st.plotly_chart(fig, key="eval_plot")
st.caption("each point: one setting (the mean over its seeds); bars: the smallest to the largest value over them")

# probing: accuracy against k, the SAE's latents beside the raw activations
curve = re.compile(r"^probing\.(llm|sae)_top_(\d+)_test_accuracy$")
probed = [r for r in rows if any(curve.match(k) for k in r.scores)]
if probed:
    st.subheader("Sparse probing")
    pfig = go.Figure()
    for r in probed:
        for who, dash in (("sae", "solid"), ("llm", "dot")):
            ks = sorted(int(m.group(2)) for k in r.scores if (m := curve.match(k)) and m.group(1) == who)
            pfig.add_trace(go.Scatter(x=ks, y=[r.scores[f"probing.{who}_top_{k}_test_accuracy"] for k in ks],
                                      mode="lines+markers", line=dict(dash=dash),
                                      name=f"{label[id(r)]} ({'latents' if who == 'sae' else 'raw dims'})"))
    pfig.update_layout(xaxis_title="k (latents or raw dimensions the probe reads)", yaxis_title="test accuracy",
                       xaxis_type="log", height=400, margin=dict(l=10, r=10, t=30, b=10))
    all_ks = sorted({int(m.group(2)) for r in probed for k in r.scores if (m := curve.match(k))})
    pfig.update_xaxes(tickvals=all_ks, ticktext=[str(k) for k in all_ks])
    st.plotly_chart(pfig, key="probe_plot")
    st.caption("the mean over the probing tasks; the raw-dimension curves pick dimensions by the same mean "
               "difference; `saelab eval --suite probing` prints each task's")
