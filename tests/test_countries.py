"""Country facts from the offline packages (replbook.countries): the material of chapter 01's
facts and chapter 02's country questions."""
import pytest

from replbook.countries import CONTINENTS, RELATIONS, country_values


def test_the_most_populous_countries_come_first_each_with_its_relations_in_order():
    rows = country_values(4, ["capital", "continent", "demonym"])
    assert rows[:3] == [("China", "capital", "Beijing"), ("China", "continent", "Asia"),
                        ("China", "demonym", "Chinese")]
    assert [country for country, _, _ in rows[::3]] == ["China", "India", "United States", "Indonesia"]
    assert [relation for _, relation, _ in rows] == ["capital", "continent", "demonym"] * 4


def test_excluded_countries_are_replaced_by_the_next_most_populous():
    """``countries`` counts the countries given, after the exclusions: leaving two out of the
    top four still gives four."""
    rows = country_values(4, ["capital"], exclude={"India", "United States"})
    assert [country for country, _, _ in rows] == ["China", "Indonesia", "Pakistan", "Brazil"]


def test_continents_follow_geonames_codes():
    by_country = {c: v for c, _, v in country_values(60, ["continent"])}
    assert by_country["Brazil"] == "South America" and by_country["Mexico"] == "North America"
    assert by_country["Germany"] == "Europe" and by_country["Nigeria"] == "Africa"
    assert set(by_country.values()) <= set(CONTINENTS.values())


def test_a_value_a_package_lacks_is_left_out_not_given_empty():
    for relation in RELATIONS:
        rows = country_values(300, [relation])
        assert rows and all(value for _, _, value in rows), relation
    demonyms = country_values(300, ["demonym"])
    assert len(demonyms) < len(country_values(300, ["continent"])), "some territories have no demonym"
    assert ("Brazil", "demonym", "Brazilian") in demonyms


def test_an_unknown_relation_is_refused_naming_it():
    with pytest.raises(ValueError, match=r"\['flag'\] unknown; choose from"):
        country_values(3, ["capital", "flag"])
