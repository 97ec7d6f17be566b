"""The experiment service: spec, planner, driver, store and reports. It never touches tensors."""
