"""Reference data shipped with censorwatch (see README.md beside it for sources and licences)."""

from pathlib import Path

HERE = Path(__file__).resolve().parent
ASN_NAMES = HERE / "asn_names_kh.csv"  # Cambodian ASN -> network name, from OONI data and the iMAP ISP table
