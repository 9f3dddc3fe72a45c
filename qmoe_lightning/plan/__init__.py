"""The memory and communication planner: `python -m qmoe_lightning.plan --config <recipe>` (`__main__.py`; the method
in docs/planning.md). `plan.plan_recipe` plans a recipe, `simulate.plan_step` one rank's fake step, `measure` runs
the step for real beside its plan."""
