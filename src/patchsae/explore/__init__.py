"""The explorer web app: upload an image, click a patch, read the latents that fire there.

``patchsae explore --atlas DIR`` serves a FastAPI app with one static page (``docs/explorer.md``).
The logic is plain functions (:mod:`patchsae.explore.core`) and the :class:`Explorer` class;
HTTP lives in :mod:`patchsae.explore.server`. FastAPI and uvicorn come with the ``explore`` extra.
"""
