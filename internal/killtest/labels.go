package killtest

// The label values the exporters must emit, spelt out rather than taken
// from the package, so that a renamed constant shows up in their tests as
// a changed metric.
var (
	DiscardLabels = []string{"marked_bad", "invalidated", "max_age", "max_idle",
		"server_closed", "left_in_tx", "driver_reset", "ping_failed"}
	ClassLabels = []string{"other", "canceled", "conn_lost", "shutdown", // index 1 on: "none" is left out
		"cannot_connect", "session_timeout", "read_only", "serialization", "auth"}
	NotRetriedLabels = []string{"may_have_run", "in_tx", "retry_off"}
	RetriedLabels    = []string{"not_sent", "read_only", "idempotent", "unavailable"}
	CauseLabels      = []string{"crash", "restart", "read_only", "shutdown"}
	TxCauseLabels    = []string{"serialization", "deadlock", "conn_lost", "unique", "extra"}
)
