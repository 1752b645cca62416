"""Pure figure builders: data in, plotly Figure / graphviz DOT / HTML out. No Streamlit here.

    routing       utilization, router probabilities, load balance, co-activation, domain specialisation
    tokens        token explorer HTML and table
    architecture  DOT of one MoE layer coloured by a compression plan
    tradeoffs     accuracy/latency vs compression, perplexity, CV, drift, Pareto front
    recovery      the three recovery loss terms per step
"""

from moeviz.figures.architecture import expert_label, moe_layer_dot, sparsity_color
from moeviz.figures.routing import (
    coactivation_heatmap, coactivation_matrix, domain_specialization, domain_specialization_matrix,
    load_balance_comparison, load_balance_cv_bars, router_probability_histogram, utilization_heatmap,
)
from moeviz.figures.recovery import recovery_losses
from moeviz.figures.tokens import token_routing_html, token_routing_table
from moeviz.figures.tradeoffs import (
    add_recovery_arrows, cv_vs_ratio, drift_per_layer, pareto_chart, perplexity_vs_ratio, projected_device, tradeoff_chart,
)

__all__ = [
    "add_recovery_arrows", "coactivation_heatmap", "coactivation_matrix", "cv_vs_ratio", "domain_specialization",
    "domain_specialization_matrix", "drift_per_layer", "expert_label", "load_balance_comparison",
    "load_balance_cv_bars", "moe_layer_dot", "pareto_chart", "perplexity_vs_ratio", "recovery_losses",
    "router_probability_histogram", "sparsity_color", "token_routing_html", "token_routing_table",
    "projected_device", "tradeoff_chart", "utilization_heatmap",
]
