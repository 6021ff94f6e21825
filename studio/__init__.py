"""The app's logic with no Gradio import (so it is tested without a server): the runs folder,
text made safe for the page."""
