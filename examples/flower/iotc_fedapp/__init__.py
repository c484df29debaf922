"""A Flower app that trains a small MLP on non-IID partitions of scikit-learn's digits, with
plain FedAvg or with iotcompress's compressed FedAvg (run config ``compress``)."""
