"""Speed benchmarks, run as scripts (`make bench`); a package so that what they share
(`benchmarks.common`) imports by one name, in worker processes too."""
