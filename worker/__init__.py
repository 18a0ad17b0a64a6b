"""The RunPod worker: renders a job's video, uploads it (and a poster), reports progress.

`worker.contract` is the shared schema, imported by the gateway as well; it needs pydantic only,
so nothing here may import the RunPod SDK or PyAV at module level.
"""
