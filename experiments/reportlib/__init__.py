"""Reports built from run directories' metrics.json files alone (design.md section 6):
``collect`` reads them into flat rows, ``tables`` aggregates seeds and writes Markdown/CSV,
``plots`` draws the PNGs (matplotlib, Agg)."""
