"""Country names for headlines ("blocked in Cambodia"), English and Khmer; an unknown code shows as itself."""

from __future__ import annotations


def _table(text: str) -> dict[str, str]:
    return dict(line.split(" ", 1) for line in text.strip().splitlines())


NAMES_EN = _table("""
AE United Arab Emirates
AF Afghanistan
AR Argentina
AU Australia
AZ Azerbaijan
BD Bangladesh
BH Bahrain
BR Brazil
BY Belarus
CA Canada
CN China
CU Cuba
DE Germany
EG Egypt
ES Spain
ET Ethiopia
FR France
GB United Kingdom
HK Hong Kong
ID Indonesia
IN India
IQ Iraq
IR Iran
IT Italy
JO Jordan
JP Japan
KG Kyrgyzstan
KH Cambodia
KP North Korea
KR South Korea
KZ Kazakhstan
LA Laos
LB Lebanon
LK Sri Lanka
MM Myanmar
MX Mexico
MY Malaysia
NG Nigeria
NL Netherlands
NP Nepal
PH Philippines
PK Pakistan
PS Palestine
QA Qatar
RU Russia
SA Saudi Arabia
SD Sudan
SG Singapore
SY Syria
TH Thailand
TJ Tajikistan
TL Timor-Leste
TM Turkmenistan
TR Türkiye
TW Taiwan
TZ Tanzania
UA Ukraine
UG Uganda
US United States
UZ Uzbekistan
VE Venezuela
VN Vietnam
YE Yemen
ZW Zimbabwe
""")

NAMES_KM = _table("""
KH កម្ពុជា
TH ថៃ
VN វៀតណាម
LA ឡាវ
MM មីយ៉ាន់ម៉ា
CN ចិន
MY ម៉ាឡេស៊ី
ID ឥណ្ឌូណេស៊ី
PH ហ្វីលីពីន
SG សិង្ហបុរី
US សហរដ្ឋអាមេរិក
""")


def country_name(cc: str, language: str = "en") -> str:
    code = cc.upper()
    if language == "km" and code in NAMES_KM:
        return NAMES_KM[code]
    return NAMES_EN.get(code, code)
