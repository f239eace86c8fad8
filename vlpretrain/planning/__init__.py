"""The layout planner behind ``vlpretrain plan --search``: a cluster description (``cluster``), a step-time and
memory model per layout with communication and FSDP sharding (``cost``), its efficiency table fitted to
published GPU runs (``efficiency`` + ``fitted_efficiency.json``), the model's parts from a config or from a
published run (``parts``), and the search over every layout ``resolve_layout`` accepts (``search``)."""
