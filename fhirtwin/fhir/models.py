"""The one door to typed FHIR models: R4 (4.0.1) JSON checked with ``fhir.resources.R4B`` models.

Why a wrapper: no released ``fhir.resources`` ships R4 models for pydantic v2, and its package root is R5.
R4B (4.3.0) is wire-compatible with R4 for everything clinical, so the R4B models are used, but the
differences are guarded here and nowhere else:

* resource types that exist in R4 but not in R4B (:data:`R4_ONLY_TYPES`) and the two resources R4B
  restructured (:data:`R4B_RESTRUCTURED_TYPES`) get structural checks only (their R4 shape would be
  wrongly rejected by the R4B models);
* the R4-only choice elements ``valueMeta``/``defaultValueMeta``/``fixedMeta``/``patternMeta`` are
  checked as ``Meta`` on their own, since R4B no longer has them;
* R4B-only resource types (:data:`R4B_ONLY_TYPES`) and R4B-only elements are never R4:
  :func:`validate_resource` rejects them on input and :func:`check_emittable` refuses to send them;
* ``fhir.resources`` raises a bare ``KeyError`` for an unknown nested ``resourceType`` (and fails a whole
  Bundle for one bad entry): both become :class:`ResourceValidationError`, and
  :func:`validate_bundle_entries` checks a Bundle entry by entry.

The raw dict stays the source of truth: models validate a deep copy and are then thrown away (a model
dump is lossy: decimals, instants). Errors carry locations and messages, never element values, so they
can be logged and put in the data-quality ledger without leaking patient data.

Never import ``fhir.resources`` (R5) or ``fhir.resources.R4B`` anywhere else in fhirtwin.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from decimal import Decimal
from functools import cache
from typing import Any

from pydantic import ValidationError

__all__ = [
    "R4B_ONLY_TYPES",
    "R4B_RESTRUCTURED_TYPES",
    "R4_ONLY_TYPES",
    "R4_RESOURCE_TYPES",
    "Issue",
    "ResourceValidationError",
    "check_emittable",
    "model_class",
    "validate_bundle_entries",
    "validate_resource",
]

#: In R4 4.0.1 but not in R4B: read as raw dicts with structural checks only.
R4_ONLY_TYPES: frozenset[str] = frozenset(
    {
        "MedicinalProduct",
        "MedicinalProductAuthorization",
        "MedicinalProductContraindication",
        "MedicinalProductIndication",
        "MedicinalProductIngredient",
        "MedicinalProductInteraction",
        "MedicinalProductManufactured",
        "MedicinalProductPackaged",
        "MedicinalProductPharmaceutical",
        "MedicinalProductUndesirableEffect",
        "SubstanceNucleicAcid",
        "SubstancePolymer",
        "SubstanceProtein",
        "SubstanceReferenceInformation",
        "SubstanceSourceMaterial",
        "SubstanceSpecification",
        "EffectEvidenceSynthesis",
        "RiskEvidenceSynthesis",
    }
)

#: In R4B but not in R4 4.0.1: never valid on the R4 wire, never emitted.
R4B_ONLY_TYPES: frozenset[str] = frozenset(
    {
        "AdministrableProductDefinition",
        "Citation",
        "ClinicalUseDefinition",
        "EvidenceReport",
        "Ingredient",
        "ManufacturedItemDefinition",
        "MedicinalProductDefinition",
        "NutritionProduct",
        "PackagedProductDefinition",
        "RegulatedAuthorization",
        "SubscriptionStatus",
        "SubscriptionTopic",
        "SubstanceDefinition",
    }
)

#: Same name in R4 and R4B, different structure: the R4B model cannot judge R4 content.
R4B_RESTRUCTURED_TYPES: frozenset[str] = frozenset({"Evidence", "EvidenceVariable"})

#: Every resource type of FHIR R4 4.0.1.
R4_RESOURCE_TYPES: frozenset[str] = R4_ONLY_TYPES | frozenset(
    {
        "Account", "ActivityDefinition", "AdverseEvent", "AllergyIntolerance", "Appointment",
        "AppointmentResponse", "AuditEvent", "Basic", "Binary", "BiologicallyDerivedProduct", "BodyStructure",
        "Bundle", "CapabilityStatement", "CarePlan", "CareTeam", "CatalogEntry", "ChargeItem",
        "ChargeItemDefinition", "Claim", "ClaimResponse", "ClinicalImpression", "CodeSystem", "Communication",
        "CommunicationRequest", "CompartmentDefinition", "Composition", "ConceptMap", "Condition", "Consent",
        "Contract", "Coverage", "CoverageEligibilityRequest", "CoverageEligibilityResponse", "DetectedIssue",
        "Device", "DeviceDefinition", "DeviceMetric", "DeviceRequest", "DeviceUseStatement",
        "DiagnosticReport", "DocumentManifest", "DocumentReference", "Encounter", "Endpoint",
        "EnrollmentRequest", "EnrollmentResponse", "EpisodeOfCare", "EventDefinition", "Evidence",
        "EvidenceVariable", "ExampleScenario", "ExplanationOfBenefit", "FamilyMemberHistory", "Flag", "Goal",
        "GraphDefinition", "Group", "GuidanceResponse", "HealthcareService", "ImagingStudy", "Immunization",
        "ImmunizationEvaluation", "ImmunizationRecommendation", "ImplementationGuide", "InsurancePlan",
        "Invoice", "Library", "Linkage", "List", "Location", "Measure", "MeasureReport", "Media", "Medication",
        "MedicationAdministration", "MedicationDispense", "MedicationKnowledge", "MedicationRequest",
        "MedicationStatement", "MessageDefinition", "MessageHeader", "MolecularSequence", "NamingSystem",
        "NutritionOrder", "Observation", "ObservationDefinition", "OperationDefinition", "OperationOutcome",
        "Organization", "OrganizationAffiliation", "Parameters", "Patient", "PaymentNotice",
        "PaymentReconciliation", "Person", "PlanDefinition", "Practitioner", "PractitionerRole", "Procedure",
        "Provenance", "Questionnaire", "QuestionnaireResponse", "RelatedPerson", "RequestGroup",
        "ResearchDefinition", "ResearchElementDefinition", "ResearchStudy", "ResearchSubject",
        "RiskAssessment", "Schedule", "SearchParameter", "ServiceRequest", "Slot", "Specimen",
        "SpecimenDefinition", "StructureDefinition", "StructureMap", "Subscription", "Substance",
        "SupplyDelivery", "SupplyRequest", "Task", "TerminologyCapabilities", "TestReport", "TestScript",
        "ValueSet", "VerificationResult", "VisionPrescription",
    }
)  # fmt: skip

#: R4 choice elements of type Meta that R4B dropped (checked as Meta on their own).
_R4_META_CHOICES = frozenset({"valueMeta", "defaultValueMeta", "fixedMeta", "patternMeta"})
#: Datatypes new in R4B: any ``<name>[x]`` element typed with them is R4B-only.
_R4B_ONLY_DATATYPE_SUFFIXES = ("CodeableReference", "RatioRange")
#: Elements new in R4B on resources that exist in both (resource type -> element names, at any depth).
_R4B_ONLY_ELEMENTS: dict[str, frozenset[str]] = {
    "ActivityDefinition": frozenset({"subjectCanonical"}),
    "PlanDefinition": frozenset({"subjectCanonical"}),
}
#: Keys under which a whole resource is nested (Bundle.entry.resource, .response.outcome, contained,
#: Parameters.parameter.resource).
_NESTED_RESOURCE_KEYS = frozenset({"resource", "outcome"})
_ID_RE = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_TYPE_RE = re.compile(r"^[A-Z][A-Za-z]{0,63}$")
_MAX_MESSAGE = 160
#: Deeper than any real resource (a Bundle of contained extensions stays far below), shallow enough that
#: the recursive checks and the models never hit Python's recursion limit.
_MAX_DEPTH = 100
_MAX_ISSUES_IN_TEXT = 5


@dataclass(frozen=True)
class Issue:
    """One problem: where (``code.coding[0].code``) and what, never the offending value."""

    location: str
    message: str

    def __str__(self) -> str:
        return f"{self.location or '(resource)'}: {self.message}"


class ResourceValidationError(ValueError):
    """A resource is not valid FHIR R4 JSON (or must not be sent to an R4 server).

    Carries the resource type, its id (only if it is a well-formed FHIR id) and the issues found, so that
    the caller can log or ledger it without echoing element values that could be patient data.
    """

    def __init__(self, resource_type: str | None, resource_id: str | None, issues: list[Issue] | tuple[Issue, ...]):
        self.resource_type = resource_type
        self.resource_id = resource_id
        self.issues: tuple[Issue, ...] = tuple(issues)
        super().__init__(self.summary)

    @property
    def locations(self) -> list[str]:
        """The element locations of every issue, in order."""
        return [i.location for i in self.issues]

    @property
    def summary(self) -> str:
        """One line: ``Observation/o1: 2 issue(s): loc: message; ...`` (first few issues)."""
        label = f"{self.resource_type or 'resource'}/{self.resource_id or '?'}"
        shown = "; ".join(str(i) for i in self.issues[:_MAX_ISSUES_IN_TEXT])
        more = f"; +{len(self.issues) - _MAX_ISSUES_IN_TEXT} more" if len(self.issues) > _MAX_ISSUES_IN_TEXT else ""
        return f"{label}: {len(self.issues)} issue(s): {shown}{more}"


# ---------------------------------------------------------------------------- model lookup


@cache
def model_class(resource_type: str) -> type[Any]:
    """The R4B model class for an R4 resource type (cached: the lookup imports a module).

    Raises KeyError for types that have no usable R4B model (R4-only, restructured, R4B-only, unknown).
    """
    if resource_type not in R4_RESOURCE_TYPES or resource_type in R4_ONLY_TYPES | R4B_RESTRUCTURED_TYPES:
        raise KeyError(resource_type)
    from fhir.resources.R4B import get_fhir_model_class

    return get_fhir_model_class(resource_type)


@cache
def _datatype_class(name: str) -> type[Any]:
    from fhir.resources.R4B import get_fhir_model_class

    return get_fhir_model_class(name)


# ---------------------------------------------------------------------------- validation


def validate_resource(resource: dict[str, Any]) -> dict[str, Any]:
    """Check one R4 resource and return it unchanged; raise :class:`ResourceValidationError` if invalid.

    The R4B model validates a deep copy (the models mutate their input and their dumps are lossy); JSON
    rules the models miss (``null`` values, empty objects/arrays, non-finite numbers, nested resources
    without a type) are checked on the raw dict.
    """
    if not isinstance(resource, Mapping):
        raise ResourceValidationError(None, None, [Issue("", "not a JSON object")])
    rtype = resource.get("resourceType")
    rid = resource.get("id")
    safe_id = rid if isinstance(rid, str) and _ID_RE.match(rid) else None
    safe_type = rtype if isinstance(rtype, str) and _TYPE_RE.match(rtype) else None
    if _too_deep(resource):
        raise ResourceValidationError(safe_type, safe_id, [Issue("", f"nested deeper than {_MAX_DEPTH} levels")])
    issues = list(_json_issues(resource, ""))
    type_issue = _type_issue(rtype, "")
    if type_issue is not None:
        raise ResourceValidationError(safe_type, safe_id, [type_issue, *issues])
    if rtype in R4_ONLY_TYPES or rtype in R4B_RESTRUCTURED_TYPES:
        issues.extend(_structural_issues(resource))
    else:
        work = copy.deepcopy(dict(resource))
        issues.extend(_prepare_copy(work, ""))
        issues.extend(_model_issues(model_class(rtype), work))
    if issues:
        raise ResourceValidationError(safe_type, safe_id, _dedupe(issues))
    return resource


def validate_bundle_entries(bundle: Mapping[str, Any]) -> list[tuple[Any, ResourceValidationError | None]]:
    """Validate each ``Bundle.entry.resource`` on its own, so one bad entry does not sink the Bundle.

    Returns ``(resource, error or None)`` per entry that has a ``resource``, in entry order (the resource
    as given: the same object, unchanged). Raises :class:`ResourceValidationError` if ``bundle`` is not a
    Bundle at all.
    """
    if not isinstance(bundle, Mapping) or bundle.get("resourceType") != "Bundle":
        raise ResourceValidationError(None, None, [Issue("resourceType", "not a Bundle")])
    entries = bundle.get("entry")
    if entries is None:
        return []
    if not isinstance(entries, list):
        rid = bundle.get("id")
        raise ResourceValidationError(
            "Bundle", rid if isinstance(rid, str) and _ID_RE.match(rid) else None, [Issue("entry", "not a list")]
        )
    out: list[tuple[Any, ResourceValidationError | None]] = []
    for entry in entries:
        if not isinstance(entry, Mapping) or "resource" not in entry:
            continue
        resource = entry["resource"]
        try:
            validate_resource(resource)
        except ResourceValidationError as exc:
            out.append((resource, exc))
        else:
            out.append((resource, None))
    return out


def check_emittable(resource: Any) -> None:
    """Raise :class:`ResourceValidationError` if sending ``resource`` would put non-R4 content on the wire.

    Refused: R4B-only or unknown resource types (top level, contained, Bundle entries, parameters), any
    element typed with an R4B-only datatype (``valueCodeableReference``, ``valueRatioRange``,
    ``defaultValueCodeableReference``…) and R4B-only elements such as ``PlanDefinition.subjectCanonical``.
    Use it next to :func:`validate_resource`, which checks the rest.
    """
    if not isinstance(resource, Mapping):
        raise ResourceValidationError(None, None, [Issue("", "not a JSON object")])
    rtype = resource.get("resourceType")
    rid = resource.get("id")
    if _too_deep(resource):
        raise ResourceValidationError(None, None, [Issue("", f"nested deeper than {_MAX_DEPTH} levels")])
    issues = list(_emit_issues(resource, "", rtype if isinstance(rtype, str) else None))
    type_issue = _type_issue(rtype, "")
    if type_issue is not None:
        issues.insert(0, type_issue)
    if issues:
        raise ResourceValidationError(
            rtype if isinstance(rtype, str) and _TYPE_RE.match(rtype) else None,
            rid if isinstance(rid, str) and _ID_RE.match(rid) else None,
            _dedupe(issues),
        )


# ---------------------------------------------------------------------------- helpers


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _too_deep(node: Any) -> bool:
    """True if JSON nests deeper than any FHIR resource does (checked without recursion)."""
    stack = [(node, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > _MAX_DEPTH:
            return True
        if isinstance(item, Mapping):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return False


def _type_issue(rtype: Any, path: str) -> Issue | None:
    where = _join(path, "resourceType")
    if not isinstance(rtype, str) or not rtype:
        return Issue(where, "missing or not a string")
    if rtype in R4B_ONLY_TYPES:
        return Issue(where, "R4B-only resource type, not part of FHIR R4")
    if rtype not in R4_RESOURCE_TYPES:
        return Issue(where, "unknown resource type" if _TYPE_RE.match(rtype) else "malformed resource type")
    return None


def _json_issues(node: Any, path: str) -> Iterator[Issue]:
    """FHIR JSON rules on the raw value: no null (except inside primitive arrays), no empty object or
    array, finite numbers only, string keys only, JSON types only."""
    if isinstance(node, Mapping):
        if not node:
            yield Issue(path, "empty object")
        for key, value in node.items():
            if not isinstance(key, str) or not key:
                yield Issue(path, "non-string or empty key")
                continue
            where = _join(path, key)
            if value is None:
                yield Issue(where, "null is not allowed")
            elif isinstance(value, list):
                if not value:
                    yield Issue(where, "empty array")
                # nulls are allowed in a primitive array aligned with its extension array (given/_given)
                sibling = key[1:] if key.startswith("_") else f"_{key}"
                nulls_ok = sibling in node
                for i, item in enumerate(value):
                    if item is None:
                        if not nulls_ok:
                            yield Issue(_join(where, i), "null is not allowed")
                    else:
                        yield from _json_issues(item, _join(where, i))
            else:
                yield from _json_issues(value, where)
    elif isinstance(node, list):
        yield Issue(path, "nested array")
    elif isinstance(node, bool | str | int):
        return
    elif isinstance(node, float | Decimal):
        if not math.isfinite(node):
            yield Issue(path, "number is not finite")
    else:
        yield Issue(path, f"not a JSON value ({type(node).__name__})")


def _structural_issues(resource: Mapping[str, Any]) -> list[Issue]:
    """What can be checked without a model: the id, and the common DomainResource elements."""
    issues: list[Issue] = []
    rid = resource.get("id")
    if rid is not None and not (isinstance(rid, str) and _ID_RE.match(rid)):
        issues.append(Issue("id", "not a valid FHIR id"))
    common = {k: copy.deepcopy(resource[k]) for k in ("meta", "implicitRules", "language", "text", "extension",
                                                     "modifierExtension") if k in resource}
    issues.extend(_model_issues(_datatype_class("DomainResource"), common))
    contained = resource.get("contained")
    if contained is not None:
        if not isinstance(contained, list):
            issues.append(Issue("contained", "not a list"))
        else:
            for i, inner in enumerate(contained):
                try:
                    validate_resource(inner)
                except ResourceValidationError as exc:
                    issues.extend(Issue(_prefix(_join("contained", i), x.location), x.message) for x in exc.issues)
    return issues


def _prefix(path: str, location: str) -> str:
    if not location:
        return path
    return f"{path}{location}" if location.startswith("[") else f"{path}.{location}"


_PLACEHOLDER_CODE = {"text": "placeholder for a resource checked separately"}


def _prepare_copy(node: Any, path: str) -> list[Issue]:
    """Make the copy digestible for the R4B model and check what it cannot.

    Nested resources of R4-only/restructured/unknown types are checked on their own and replaced by a
    placeholder ``Basic`` (keeping list positions, so other locations stay right); R4-only Meta choice
    elements are checked as Meta and removed.
    """
    issues: list[Issue] = []
    if isinstance(node, dict):
        for key in list(node):
            value = node[key]
            where = _join(path, key)
            if key in _R4_META_CHOICES and isinstance(value, dict):
                meta = copy.deepcopy(value)
                issues.extend(Issue(_prefix(where, x.location), x.message)
                              for x in _model_issues(_datatype_class("Meta"), meta))
                del node[key]
            elif key in _NESTED_RESOURCE_KEYS and isinstance(value, dict) and "resourceType" in value:
                issues.extend(_nested(node, key, where))
            elif key == "contained" and isinstance(value, list):
                for i, item in enumerate(value):
                    if isinstance(item, dict):
                        issues.extend(_nested(value, i, _join(where, i)))
                    else:
                        issues.append(Issue(_join(where, i), "not a resource"))
                        value[i] = _placeholder(None)
            else:
                issues.extend(_prepare_copy(value, where))
    elif isinstance(node, list):
        for i, item in enumerate(node):
            issues.extend(_prepare_copy(item, _join(path, i)))
    return issues


def _nested(container: Any, key: Any, where: str) -> list[Issue]:
    inner = container[key]
    rtype = inner.get("resourceType")
    type_issue = _type_issue(rtype, where)
    if type_issue is not None:
        container[key] = _placeholder(inner.get("id"))
        return [type_issue]
    if rtype in R4_ONLY_TYPES or rtype in R4B_RESTRUCTURED_TYPES:
        container[key] = _placeholder(inner.get("id"))
        return [Issue(_prefix(where, x.location), x.message) for x in _structural_issues(inner)]
    return _prepare_copy(inner, where)


def _placeholder(rid: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"resourceType": "Basic", "code": dict(_PLACEHOLDER_CODE)}
    if isinstance(rid, str) and _ID_RE.match(rid):
        out["id"] = rid
    return out


def _model_issues(cls: type[Any], data: dict[str, Any]) -> list[Issue]:
    """Validate ``data`` (a copy: it is consumed) and turn model errors into value-free issues."""
    try:
        cls.model_validate(data)
    except ValidationError as exc:
        return [Issue(_loc(err.get("loc", ())), _message(err)) for err in exc.errors(include_input=False)]
    except KeyError:
        # fhir.resources raises a bare KeyError for a nested resource type it has no model for; the
        # pre-pass replaces those, so this is a last line of defence without a precise location.
        return [Issue("", "nested resource of a type without an R4 model")]
    return []


def _loc(loc: tuple[Any, ...]) -> str:
    path = ""
    for part in loc:
        path = _join(path, part if isinstance(part, int) else str(part))
    return path


def _message(err: Mapping[str, Any]) -> str:
    text = " ".join(str(err.get("msg", "invalid")).split())
    text = text.removeprefix("Value error, ")
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 1] + "…"


def _dedupe(issues: list[Issue]) -> list[Issue]:
    return list(dict.fromkeys(issues))


def _emit_issues(node: Any, path: str, rtype: str | None) -> Iterator[Issue]:
    """R4B-only content anywhere in an outgoing resource (types of nested resources included)."""
    if isinstance(node, Mapping):
        own = _R4B_ONLY_ELEMENTS.get(rtype or "", frozenset())
        for key, value in node.items():
            if not isinstance(key, str):
                continue
            where = _join(path, key)
            name = key.removeprefix("_")
            if name in own:
                yield Issue(where, f"element added in R4B, not part of {rtype} in FHIR R4")
            elif name.endswith(_R4B_ONLY_DATATYPE_SUFFIXES) and name not in _R4B_ONLY_DATATYPE_SUFFIXES:
                yield Issue(where, "element of an R4B-only datatype (CodeableReference/RatioRange)")
            if isinstance(value, Mapping) and key in _NESTED_RESOURCE_KEYS and "resourceType" in value:
                inner = value.get("resourceType")
                type_issue = _type_issue(inner, where)
                if type_issue is not None:
                    yield type_issue
                yield from _emit_issues(value, where, inner if isinstance(inner, str) else None)
            elif key == "contained" and isinstance(value, list):
                for i, item in enumerate(value):
                    inner = item.get("resourceType") if isinstance(item, Mapping) else None
                    type_issue = _type_issue(inner, _join(where, i))
                    if type_issue is not None:
                        yield type_issue
                    yield from _emit_issues(item, _join(where, i), inner if isinstance(inner, str) else None)
            else:
                yield from _emit_issues(value, where, rtype)
    elif isinstance(node, list):
        for i, item in enumerate(node):
            yield from _emit_issues(item, _join(path, i), rtype)
