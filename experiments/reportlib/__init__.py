"""Reports built from run directories' metrics.json files alone (read back as ``mixsga_train.metrics.RunMetrics``):
``collect`` reads them into flat rows, ``tables`` aggregates seeds and writes Markdown/CSV,
``plots`` draws the PNGs (matplotlib, Agg)."""
