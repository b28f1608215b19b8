"""Where studies live by default, and the attribute names autoprune keeps in an Optuna study and
its trials: the study's record format, shared by the search that writes it and the reports,
listings and exports that read it. (Import-light: the CLI reads it before anything heavy.)"""

DEFAULT_STORAGE = "sqlite:///studies/autoprune.db"

# study user attributes
SETTINGS_ATTR = "autoprune:settings"        # what defines the study (compared on resume)
DENSE_ATTR = "autoprune:dense"              # the dense baseline's val accuracy, FLOPs, throughput
WARM_STARTED_ATTR = "autoprune:warm_started"
UID_ATTR = "autoprune:uid"                  # names the study's checkpoint folder: unique across storages
# study system attribute
LEASE_KEY = "autoprune:lease"               # which search drives the study now

# trial user attributes
OUTCOME = "autoprune:outcome"               # complete | failed | stopped | infeasible | interrupted
REASON = "autoprune:reason"
WARM_START = "autoprune:warm_start"         # the hand-designed config this trial measures
RETRY_OF = "autoprune:retry_of"             # the interrupted trial this one re-runs
