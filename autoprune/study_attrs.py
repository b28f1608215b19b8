"""Where studies live by default, and the attribute names autoprune keeps in an Optuna study and
its trials: the study's record format, shared by the search that writes it and the reports,
listings and exports that read it. (Import-light: the CLI reads it before anything heavy.)"""

DEFAULT_STORAGE = "sqlite:///studies/autoprune.db"

# study user attributes
SETTINGS_ATTR = "autoprune:settings"        # what defines the study (compared on resume)
DENSE_ATTR = "autoprune:dense"              # the dense baseline's val accuracy, FLOPs, throughput
WARM_STARTED_ATTR = "autoprune:warm_started"
UID_ATTR = "autoprune:uid"                  # names the study's checkpoint folder: unique across storages
FRONT_TIMING_ATTR = "autoprune:front_timing"  # the front re-timed against dense at the end of a search
# study system attribute
LEASE_KEY = "autoprune:lease"               # which search drives the study now

# trial user attributes
OUTCOME = "autoprune:outcome"               # complete | failed | stopped | infeasible | interrupted
REASON = "autoprune:reason"
WARM_START = "autoprune:warm_start"         # the hand-designed config this trial measures
RETRY_OF = "autoprune:retry_of"             # the interrupted trial this one re-runs

# screening (a companion study "<study>:screen" holds the off-the-shelf screens)
SCREEN_SUFFIX = ":screen"
SCREEN_OF_ATTR = "autoprune:screen_of"      # on the screen study: the uid of the study it screens for
PROMOTED_ATTR = "autoprune:promoted"        # main study: the screen trials promoted to fine-tuning
SCREEN_TAU_ATTR = "autoprune:screen_tau"    # main study: how well the screen ranked the fine-tunes
SCREEN_TRIAL = "autoprune:screen_trial"     # trial: the screen trial it was promoted from
SCREEN_ACCURACY = "screen_accuracy"         # trial: off-the-shelf top-1 on the screen images, before training

# successive halving
RUNG_ACCURACY = "autoprune:rung_accuracy"   # trial: {epoch: val top-1} at each rung it reached
RUNG = "autoprune:rung"                     # trial: the rung (epoch) it was stopped at
