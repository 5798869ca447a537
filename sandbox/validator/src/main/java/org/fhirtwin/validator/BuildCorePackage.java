package org.fhirtwin.validator;

import java.io.InputStream;
import java.io.OutputStream;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.LinkedHashMap;
import java.util.Map;
import java.util.zip.ZipEntry;
import java.util.zip.ZipFile;

import org.hl7.fhir.r4.formats.IParser;
import org.hl7.fhir.r4.formats.JsonParser;
import org.hl7.fhir.r4.formats.XmlParser;
import org.hl7.fhir.r4.model.Bundle;
import org.hl7.fhir.r4.model.Resource;
import org.hl7.fhir.utilities.npm.NpmPackageIndexBuilder;

/**
 * Builds the NPM package hl7.fhir.r4.core#4.0.1 offline from HAPI FHIR's hapi-fhir-validation-resources-r4
 * jar, which carries the R4 4.0.1 definition Bundles (profiles with snapshots, extensions, ValueSets,
 * CodeSystems, search parameters) as published with the specification.
 *
 * <p>Usage: {@code BuildCorePackage <resources jar> <package cache folder>}. The package folder
 * {@code <cache>/hl7.fhir.r4.core#4.0.1} receives {@code package/package.json}, one JSON file per resource
 * ({@code Type-id.json}) and the package index. Folders are written under a temporary name and renamed at
 * the end, so a half-built package is never seen by the validator.
 *
 * <p>The validator CLI also loads three packages unconditionally ({@link #STAND_INS}): the cross-version
 * extensions ({@code http://hl7.org/fhir/5.0/StructureDefinition/extension-...}), HL7 Terminology
 * (terminology.hl7.org code systems beyond those in R4 core) and the global extensions pack. fhirtwin uses
 * none of their definitions, so empty packages of those names stand in for them: validation is then
 * against R4 core (and the profiles given with -ig) only, and a definition that only those packages hold
 * is reported as unknown rather than passed silently.
 */
public final class BuildCorePackage {

  private static final String[] BUNDLES = {
    "org/hl7/fhir/r4/model/profile/profiles-types.xml",
    "org/hl7/fhir/r4/model/profile/profiles-resources.xml",
    "org/hl7/fhir/r4/model/profile/profiles-others.xml",
    "org/hl7/fhir/r4/model/extension/extension-definitions.xml",
    "org/hl7/fhir/r4/model/valueset/valuesets.xml",
    "org/hl7/fhir/r4/model/valueset/v3-codesystems.xml",
    "org/hl7/fhir/r4/model/valueset/v2-tables.xml",
    "org/hl7/fhir/r4/model/sp/search-parameters.json",
  };

  /**
   * Packages that ValidatorCli 6.5.18 loads unconditionally after the core (ValidationEngine.initContext,
   * ValidationEngineBuilder.fromSource and ValidationService.loadIgsAndExtensions), none of which is
   * reachable offline: the cross-version extensions, HL7 Terminology (THO) 6.2.0 and the global extensions
   * pack 5.2.0, the last two also without a version (latest: offline, the one in the cache). They stand in
   * empty.
   */
  private static final String[][] STAND_INS = {
    {"hl7.fhir.xver-extensions", "0.1.0"},
    {"hl7.terminology.r4", "6.2.0"},
    {"hl7.fhir.uv.extensions.r4", "5.2.0"},
    {"hl7.terminology", "6.2.0"},
    {"hl7.fhir.uv.extensions", "5.2.0"},
  };

  private static final String PACKAGE_JSON = String.join("\n",
      "{",
      "  \"name\": \"hl7.fhir.r4.core\",",
      "  \"version\": \"4.0.1\",",
      "  \"tools-version\": 3,",
      "  \"type\": \"Core\",",
      "  \"license\": \"CC0-1.0\",",
      "  \"canonical\": \"http://hl7.org/fhir\",",
      "  \"url\": \"http://hl7.org/fhir/R4\",",
      "  \"title\": \"FHIR R4 core package (built offline from hapi-fhir-validation-resources-r4)\",",
      "  \"description\": \"Definitions of FHIR R4 4.0.1: StructureDefinitions, ValueSets, CodeSystems, SearchParameters\",",
      "  \"fhirVersions\": [\"4.0.1\"],",
      "  \"dependencies\": {},",
      "  \"author\": \"HL7 International\",",
      "  \"directories\": {\"lib\": \"package\"}",
      "}",
      "");

  private BuildCorePackage() {
  }

  public static void main(String[] args) throws Exception {
    if (args.length != 2) {
      System.err.println("usage: BuildCorePackage <hapi-fhir-validation-resources-r4.jar> <package cache folder>");
      System.exit(2);
    }
    Path cache = Files.createDirectories(Path.of(args[1]));
    for (String[] standIn : STAND_INS) {
      Path folder = cache.resolve(standIn[0] + "#" + standIn[1]);
      Path work = begin(folder);
      String manifest = "{\"name\": \"" + standIn[0] + "\", \"version\": \"" + standIn[1] + "\", \"tools-version\": 3,"
          + " \"type\": \"IG\", \"license\": \"CC0-1.0\", \"fhirVersions\": [\"4.0.1\"], \"dependencies\": {},"
          + " \"title\": \"Empty offline stand-in (fhirtwin conformance tests)\", \"directories\": {\"lib\": \"package\"}}\n";
      Files.writeString(work.resolve("package/package.json"), manifest, StandardCharsets.UTF_8);
      new NpmPackageIndexBuilder().execute(work.resolve("package").toString());
      finish(work, folder);
    }

    Path target = cache.resolve("hl7.fhir.r4.core#4.0.1");
    Path work = begin(target);
    Path pkg = work.resolve("package");
    Map<String, Resource> resources = new LinkedHashMap<>();
    try (ZipFile jar = new ZipFile(args[0])) {
      for (String name : BUNDLES) {
        ZipEntry entry = jar.getEntry(name);
        if (entry == null) {
          throw new IllegalStateException("missing in the resources jar: " + name);
        }
        IParser parser = name.endsWith(".json") ? new JsonParser() : new XmlParser();
        Bundle bundle;
        try (InputStream in = jar.getInputStream(entry)) {
          bundle = (Bundle) parser.parse(in);
        }
        for (Bundle.BundleEntryComponent e : bundle.getEntry()) {
          Resource r = e.getResource();
          if (r == null || !r.hasId()) {
            continue;
          }
          // The same definition can appear in two Bundles (e.g. a v3 CodeSystem): the first one wins.
          resources.putIfAbsent(r.fhirType() + "-" + r.getIdElement().getIdPart(), r);
        }
      }
    }
    JsonParser json = new JsonParser();
    for (Map.Entry<String, Resource> e : resources.entrySet()) {
      try (OutputStream out = Files.newOutputStream(pkg.resolve(e.getKey() + ".json"))) {
        json.compose(out, e.getValue());
      }
    }
    Files.writeString(pkg.resolve("package.json"), PACKAGE_JSON, StandardCharsets.UTF_8);
    new NpmPackageIndexBuilder().execute(pkg.toString());
    finish(work, target);
    System.out.println("hl7.fhir.r4.core#4.0.1: " + resources.size() + " resources in " + target);
  }

  private static Path begin(Path target) throws Exception {
    Path work = target.resolveSibling(target.getFileName() + ".building");
    deleteTree(work);
    Files.createDirectories(work.resolve("package"));
    return work;
  }

  private static void finish(Path work, Path target) throws Exception {
    deleteTree(target);
    Files.move(work, target);
  }

  private static void deleteTree(Path path) throws Exception {
    if (!Files.exists(path)) {
      return;
    }
    try (var walk = Files.walk(path)) {
      for (Path p : walk.sorted(java.util.Comparator.reverseOrder()).toList()) {
        Files.delete(p);
      }
    }
  }
}
