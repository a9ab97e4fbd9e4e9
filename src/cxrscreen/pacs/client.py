"""A DICOMweb PACS seen through dicomweb-client: QIDO-RS queries, WADO-RS retrieval of original instances,
STOW-RS storage. Credentials come from the environment (`credentials_from_env`), TLS is verified by default.
Every failure is a CXRError naming the study by its hash, never by a patient identifier."""

from __future__ import annotations

import datetime
import hashlib
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cxrscreen.errors import CXRError

ENV_USER, ENV_PASSWORD, ENV_TOKEN = "CXRSCREEN_PACS_USER", "CXRSCREEN_PACS_PASSWORD", "CXRSCREEN_PACS_TOKEN"
ENV_CA_BUNDLE = "CXRSCREEN_PACS_CA_BUNDLE"
TIMEOUT_S = 60.0


def study_tag(uid: str) -> str:
    """How logs name a study: 'study-' + the first 12 hex digits of the sha256 of its UID."""
    return "study-" + hashlib.sha256(uid.encode("ascii", "replace")).hexdigest()[:12]


@dataclass(frozen=True)
class Credentials:
    """HTTP basic credentials or a bearer token (or nothing)."""

    user: str | None = None
    password: str | None = None
    token: str | None = None


def credentials_from_env(env: dict[str, str] | None = None) -> Credentials:
    """CXRSCREEN_PACS_TOKEN (bearer) or CXRSCREEN_PACS_USER + CXRSCREEN_PACS_PASSWORD (basic)."""
    env = dict(os.environ) if env is None else env
    token = env.get(ENV_TOKEN) or None
    user, password = env.get(ENV_USER) or None, env.get(ENV_PASSWORD)
    if user is not None and password is None:
        raise CXRError(f"{ENV_USER} is set but {ENV_PASSWORD} is not")
    return Credentials(user=user, password=password, token=token)


def make_session(creds: Credentials, *, verify: bool | str = True) -> Any:
    """A requests Session with the credentials and TLS verification (True, or a CA bundle path)."""
    import requests

    session = requests.Session()
    if creds.token:
        session.headers["Authorization"] = f"Bearer {creds.token}"
    elif creds.user is not None:
        session.auth = (creds.user, creds.password or "")
    session.verify = verify
    return session


def _value(item: dict[str, Any], tag: str) -> str | None:
    """The first value of a DICOM JSON attribute, as text (None when absent)."""
    values = (item.get(tag) or {}).get("Value") or []
    return None if not values else str(values[0])


@dataclass(frozen=True)
class InstanceRef:
    """One instance found by QIDO."""

    study: str
    series: str
    sop: str
    sop_class: str | None


class PacsClient:
    """QIDO / WADO / STOW on one DICOMweb service root (e.g. http://host:8042/dicom-web)."""

    def __init__(self, url: str, *, creds: Credentials | None = None, verify: bool | str = True,
                 timeout: float = TIMEOUT_S) -> None:
        from dicomweb_client.api import DICOMwebClient

        self.url = url.rstrip("/")
        self.session = make_session(creds or Credentials(), verify=verify)
        self.client = DICOMwebClient(self.url, session=self.session, timeout=timeout)

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        import requests

        try:
            return fn(*args, **kwargs)
        except requests.HTTPError as exc:
            code = exc.response.status_code if exc.response is not None else "?"
            raise CXRError(f"{what} failed: HTTP {code}", self.url) from exc
        except requests.RequestException as exc:
            raise CXRError(f"{what} failed: {type(exc).__name__}", self.url) from exc
        except Exception as exc:  # an answer dicomweb-client / pydicom cannot parse (e.g. a corrupt instance)
            detail = " ".join(str(exc).split())[:200]
            raise CXRError(f"{what}: unreadable answer ({type(exc).__name__}: {detail})", self.url) from exc

    def studies(self, *, since: datetime.date | None = None) -> list[str]:
        """Study Instance UIDs of the studies with a StudyDate on or after `since` (all when None)."""
        filters = {"StudyDate": f"{since:%Y%m%d}-"} if since is not None else None
        found = self._call("QIDO study search", self.client.search_for_studies, search_filters=filters,
                           fields=["StudyInstanceUID"], get_remaining=True)
        return sorted({u for item in found if (u := _value(item, "0020000D"))})

    def instances(self, study: str) -> list[InstanceRef]:
        """Every instance of a study (UIDs and SOP class)."""
        found = self._call(f"QIDO instance search in {study_tag(study)}", self.client.search_for_instances,
                           study_instance_uid=study, fields=["SOPClassUID", "SeriesInstanceUID"],
                           get_remaining=True)
        out = []
        for item in found:
            series, sop = _value(item, "0020000E"), _value(item, "00080018")
            if series and sop:
                out.append(InstanceRef(study, series, sop, _value(item, "00080016")))
        return out

    def retrieve_dataset(self, ref: InstanceRef) -> Any:
        """The original instance as the pydicom Dataset dicomweb-client parsed (as stored: no transcoding, no
        rendered preview)."""
        return self._call(f"WADO retrieval in {study_tag(ref.study)}", self.client.retrieve_instance, ref.study,
                          ref.series, ref.sop, media_types=(("application/dicom", "*"),))

    def retrieve(self, ref: InstanceRef) -> bytes:
        """The original instance as a DICOM file (`retrieve_dataset`, written with preamble and file meta)."""
        from pydicom.filewriter import dcmwrite

        buf = io.BytesIO()
        dcmwrite(buf, self.retrieve_dataset(ref), enforce_file_format=True)  # read_xray knows it as DICOM
        return buf.getvalue()

    def store(self, datasets: Sequence[Any]) -> None:
        """STOW-RS the datasets (all in one study); CXRError when the PACS refuses any of them."""
        if not datasets:
            return
        study = str(datasets[0].StudyInstanceUID)
        for ds in datasets:  # dicomweb-client writes each as is: a dataset without preamble goes without 'DICM'
            if getattr(ds, "preamble", None) is None:
                ds.preamble = b"\x00" * 128
        resp = self._call(f"STOW in {study_tag(study)}", self.client.store_instances, list(datasets), study)
        failed = getattr(resp, "FailedSOPSequence", None) if resp is not None else None
        if failed:
            raise CXRError(f"STOW in {study_tag(study)}: the PACS refused {len(failed)} object(s)", self.url)
