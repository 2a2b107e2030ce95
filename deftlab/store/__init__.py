"""The results store: run keys, leases, and the one record each run writes (`ResultsStore`)."""

from deftlab.store.keys import canonical_json, run_key, short_digest
from deftlab.store.lease import LeaseLostError, RunInProgressError, lease_timeout
from deftlab.store.store import RECORD, RECORD_FORMAT, RecordStatus, ResultsStore, read_record

__all__ = ["RECORD", "RECORD_FORMAT", "LeaseLostError", "RecordStatus", "ResultsStore", "RunInProgressError",
           "canonical_json", "lease_timeout", "read_record", "run_key", "short_digest"]
