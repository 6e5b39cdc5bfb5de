"""dippipe's product layer: manifests, storage, scheduling on Ray, outputs and the CLI.

The mathematics lives in ``dip_core``; this package only moves jobs and bytes around it.
"""
