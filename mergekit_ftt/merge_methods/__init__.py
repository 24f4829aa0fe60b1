"""mergekit-ftt's merge methods, registered with mergekit by :mod:`mergekit_ftt.hook`."""

# mergekit's method package first: importing it runs the hook's registration, which imports
# the modules here. Were one of them imported first, that registration would re-enter it
# half-initialised.
import mergekit.merge_methods  # noqa: F401
