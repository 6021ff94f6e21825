"""The page (Gradio only): one module per tab, laid out over studio/'s logic; page.py puts them together."""
