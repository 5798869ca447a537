package org.fhirtwin.sandbox;

import org.springframework.boot.SpringApplication;
import org.springframework.boot.autoconfigure.SpringBootApplication;
import org.springframework.context.annotation.Import;

/**
 * Entry point of the fhirtwin sandbox: a HAPI FHIR R4 JPA server for local development and tests.
 *
 * <p>Boot's own Quartz, Thymeleaf, Elasticsearch-client and Flyway auto-configurations are switched
 * off because HAPI runs its own scheduler and schema handling, and the other two arrive on the
 * classpath only as transitive dependencies.
 */
@SpringBootApplication(excludeName = {
  "org.springframework.boot.autoconfigure.quartz.QuartzAutoConfiguration",
  "org.springframework.boot.autoconfigure.thymeleaf.ThymeleafAutoConfiguration",
  "org.springframework.boot.autoconfigure.elasticsearch.ElasticsearchRestClientAutoConfiguration",
  "org.springframework.boot.autoconfigure.flyway.FlywayAutoConfiguration"
})
@Import(SandboxFhirConfig.class)
public class SandboxServer {

  public static void main(String[] args) {
    SpringApplication.run(SandboxServer.class, args);
  }
}
