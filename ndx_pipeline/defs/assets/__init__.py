"""The assets, one module per stage group: extraction (corpus, activation_records + token_table, top_excerpts),
explanation (explanations + baseline_explanations + calibration_simulations), simulation (simulations +
baseline_simulations), scoring (scores), scorers (scorer_excerpts; detection, fuzzing and embedding judgements
and scores), viewer (neuron_viewer), and on demand release (the dataset export, `reports.dataset`). Each is a thin
skin over `core.stages` or a report."""
