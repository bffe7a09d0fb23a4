"""`featpipe serve INDEX_OR_FEATURES`: the index as a query service (an ASGI app on Starlette,
served by uvicorn) with a page in the browser. Plain functions do the work (engine.py: search by
image, row, key, vector, text or URL, with image queries batched into one model call); web.py
only maps HTTP to them; page.py is the one self-contained page; metrics.py counts."""
