package org.fhirtwin.sandbox;

import ca.uhn.fhir.batch2.jobs.config.Batch2JobsConfig;
import ca.uhn.fhir.batch2.jobs.export.BulkDataExportProvider;
import ca.uhn.fhir.batch2.maintenance.JobMaintenanceServiceImpl;
import ca.uhn.fhir.context.FhirContext;
import ca.uhn.fhir.context.support.IValidationSupport;
import ca.uhn.fhir.jpa.api.config.JpaStorageSettings;
import ca.uhn.fhir.jpa.api.config.ThreadPoolFactoryConfig;
import ca.uhn.fhir.jpa.api.dao.IFhirSystemDao;
import ca.uhn.fhir.jpa.batch2.JpaBatch2Config;
import ca.uhn.fhir.jpa.binary.api.IBinaryStorageSvc;
import ca.uhn.fhir.jpa.binstore.DatabaseBinaryContentStorageSvcImpl;
import ca.uhn.fhir.jpa.config.HapiJpaConfig;
import ca.uhn.fhir.jpa.config.r4.JpaR4Config;
import ca.uhn.fhir.jpa.config.util.HapiEntityManagerFactoryUtil;
import ca.uhn.fhir.jpa.model.config.PartitionSettings;
import ca.uhn.fhir.jpa.model.config.SubscriptionSettings;
import ca.uhn.fhir.jpa.model.entity.StorageSettings;
import ca.uhn.fhir.jpa.provider.JpaCapabilityStatementProvider;
import ca.uhn.fhir.jpa.provider.JpaSystemProvider;
import ca.uhn.fhir.jpa.provider.SubscriptionTriggeringProvider;
import ca.uhn.fhir.jpa.provider.ValueSetOperationProvider;
import ca.uhn.fhir.jpa.search.DatabaseBackedPagingProvider;
import ca.uhn.fhir.jpa.subscription.channel.config.SubscriptionChannelConfig;
import ca.uhn.fhir.jpa.subscription.match.config.SubscriptionProcessorConfig;
import ca.uhn.fhir.jpa.subscription.match.deliver.email.IEmailSender;
import ca.uhn.fhir.jpa.subscription.submit.config.SubscriptionSubmitterConfig;
import ca.uhn.fhir.rest.server.HardcodedServerAddressStrategy;
import ca.uhn.fhir.rest.server.RestfulServer;
import ca.uhn.fhir.rest.server.interceptor.CorsInterceptor;
import ca.uhn.fhir.rest.server.provider.ResourceProviderFactory;
import ca.uhn.fhir.rest.server.util.ISearchParamRegistry;
import jakarta.persistence.EntityManagerFactory;
import java.util.List;
import java.util.Map;
import javax.sql.DataSource;
import org.hl7.fhir.dstu2.model.Subscription.SubscriptionChannelType;
import org.springframework.beans.factory.annotation.Value;
import org.springframework.beans.factory.config.BeanPostProcessor;
import org.springframework.beans.factory.config.ConfigurableListableBeanFactory;
import org.springframework.boot.autoconfigure.orm.jpa.JpaProperties;
import org.springframework.boot.web.servlet.FilterRegistrationBean;
import org.springframework.boot.web.servlet.ServletRegistrationBean;
import org.springframework.context.annotation.Bean;
import org.springframework.context.annotation.Configuration;
import org.springframework.context.annotation.Import;
import org.springframework.context.annotation.Primary;
import org.springframework.orm.jpa.JpaTransactionManager;
import org.springframework.orm.jpa.LocalContainerEntityManagerFactoryBean;
import org.springframework.web.cors.CorsConfiguration;

/**
 * Assembles HAPI's published JPA modules into one R4 server with the behaviour fhirtwin's tests
 * rely on: rest-hook subscriptions delivered within about a second, Bulk Data export, $validate
 * against uploaded profiles, CORS, client-assigned ids, no search-result caching.
 */
@Configuration
@Import({
  JpaR4Config.class,
  HapiJpaConfig.class,
  SubscriptionSubmitterConfig.class,
  SubscriptionProcessorConfig.class,
  SubscriptionChannelConfig.class,
  JpaBatch2Config.class,
  Batch2JobsConfig.class,
  ThreadPoolFactoryConfig.class
})
public class SandboxFhirConfig {

  @Value("${fhirtwin.sandbox.base-url}")
  private String baseUrl;

  @Value("${fhirtwin.sandbox.subscription-interval-ms:500}")
  private long subscriptionIntervalMs;

  @Bean
  public JpaStorageSettings storageSettings() {
    JpaStorageSettings settings = new JpaStorageSettings();
    // Tests must see their own writes at once: never serve a cached search result.
    settings.setReuseCachedSearchResultsForMillis(null);
    // fhirtwin's cohort uses stable, client-assigned ids such as "ftp-0001".
    settings.setResourceClientIdStrategy(JpaStorageSettings.ClientIdStrategyEnum.ANY);
    settings.setResourceServerIdStrategy(JpaStorageSettings.IdStrategyEnum.UUID);
    settings.setExpungeEnabled(true);
    settings.setDeleteExpungeEnabled(true);
    settings.setAllowMultipleDelete(true);
    settings.setAllowInlineMatchUrlReferences(true);
    // A second export after new writes must see them; the sandbox never reuses an export job.
    settings.setEnableBulkExportJobReuse(false);
    settings.setJobFastTrackingEnabled(true);
    settings.setBulkExportFileRetentionPeriodHours(2);
    settings.setIndexMissingFields(StorageSettings.IndexEnabledEnum.DISABLED);
    settings.setDefaultSearchParamsCanBeOverridden(true);
    settings.setMarkResourcesForReindexingUponSearchParameterChange(true);
    return settings;
  }

  @Bean
  public SubscriptionSettings subscriptionSettings() {
    SubscriptionSettings settings = new SubscriptionSettings();
    settings.addSupportedSubscriptionType(SubscriptionChannelType.RESTHOOK);
    // HAPI's default queue poll of 5 s is shortened so a hook arrives within about a second.
    settings.setSubscriptionIntervalInMs(subscriptionIntervalMs);
    settings.setSubscriptionChangeQueuedImmediately(true);
    settings.setRestHookEndpointUrlValidationRegex(null);
    return settings;
  }

  @Bean
  public PartitionSettings partitionSettings() {
    return new PartitionSettings();
  }

  @Bean
  @Primary
  public LocalContainerEntityManagerFactoryBean entityManagerFactory(
      ConfigurableListableBeanFactory beanFactory,
      DataSource dataSource,
      FhirContext fhirContext,
      JpaStorageSettings storageSettings,
      JpaProperties jpaProperties) {
    LocalContainerEntityManagerFactoryBean factory =
        HapiEntityManagerFactoryUtil.newEntityManagerFactory(beanFactory, fhirContext, storageSettings);
    factory.setPersistenceUnitName("HAPI_PU");
    factory.setDataSource(dataSource);
    Map<String, String> properties = jpaProperties.getProperties();
    factory.setJpaPropertyMap(properties);
    return factory;
  }

  @Bean
  @Primary
  public JpaTransactionManager transactionManager(EntityManagerFactory entityManagerFactory) {
    JpaTransactionManager manager = new JpaTransactionManager();
    manager.setEntityManagerFactory(entityManagerFactory);
    return manager;
  }

  /** Required by HAPI's subscription delivery wiring even though e-mail channels are not offered. */
  @Bean
  public IEmailSender emailSender() {
    return details -> {
      throw new UnsupportedOperationException("e-mail subscriptions are not supported by the sandbox");
    };
  }

  /** Binary content (Bulk Data export output files) is kept in the database. */
  @Bean
  public IBinaryStorageSvc binaryStorageSvc() {
    return new DatabaseBinaryContentStorageSvcImpl();
  }

  @Bean
  public RestfulServer fhirServer(
      FhirContext fhirContext,
      ResourceProviderFactory resourceProviders,
      JpaSystemProvider<?, ?> systemProvider,
      IFhirSystemDao<?, ?> systemDao,
      JpaStorageSettings storageSettings,
      ISearchParamRegistry searchParamRegistry,
      IValidationSupport validationSupport,
      DatabaseBackedPagingProvider pagingProvider,
      BulkDataExportProvider bulkDataExportProvider,
      SubscriptionTriggeringProvider subscriptionTriggeringProvider,
      ValueSetOperationProvider valueSetOperationProvider) {
    RestfulServer server = new RestfulServer(fhirContext);
    server.setServerAddressStrategy(new HardcodedServerAddressStrategy(baseUrl));
    server.registerProviders(resourceProviders.createProviders());
    server.registerProviders(
        systemProvider, bulkDataExportProvider, subscriptionTriggeringProvider, valueSetOperationProvider);
    pagingProvider.setDefaultPageSize(50);
    pagingProvider.setMaximumPageSize(1000);
    server.setPagingProvider(pagingProvider);
    server.setDefaultPrettyPrint(false);
    JpaCapabilityStatementProvider capabilities = new JpaCapabilityStatementProvider(
        server, systemDao, storageSettings, searchParamRegistry, validationSupport);
    capabilities.setImplementationDescription("fhirtwin sandbox (HAPI FHIR JPA, R4)");
    server.setServerConformanceProvider(capabilities);
    server.registerInterceptor(new CorsInterceptor(corsConfiguration()));
    return server;
  }

  @Bean
  public ServletRegistrationBean<RestfulServer> fhirServlet(RestfulServer fhirServer) {
    ServletRegistrationBean<RestfulServer> registration = new ServletRegistrationBean<>(fhirServer, "/fhir/*");
    registration.setLoadOnStartup(1);
    return registration;
  }

  @Bean
  public FilterRegistrationBean<ExportRetryAfterFilter> exportRetryAfterFilter(
      @Value("${fhirtwin.sandbox.export-retry-after-s:1}") long seconds) {
    FilterRegistrationBean<ExportRetryAfterFilter> registration =
        new FilterRegistrationBean<>(new ExportRetryAfterFilter(seconds));
    registration.addUrlPatterns("/fhir/*");
    return registration;
  }

  /**
   * Batch2 maintenance runs every minute by default; Bulk Data exports in tests need seconds. The
   * frequency must be set before HAPI's scheduler registers the job, hence a post-processor.
   */
  @Bean
  public static BeanPostProcessor fastBatchMaintenance(
      @Value("${fhirtwin.sandbox.batch-maintenance-ms:1000}") long frequencyMillis) {
    return new BeanPostProcessor() {
      @Override
      public Object postProcessAfterInitialization(Object bean, String beanName) {
        if (bean instanceof JobMaintenanceServiceImpl maintenance) {
          maintenance.setScheduledJobFrequencyMillis(frequencyMillis);
        }
        return bean;
      }
    };
  }

  private static CorsConfiguration corsConfiguration() {
    CorsConfiguration cors = new CorsConfiguration();
    cors.setAllowedOriginPatterns(List.of("*"));
    cors.setAllowCredentials(false);
    cors.setAllowedMethods(List.of("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"));
    cors.setAllowedHeaders(List.of(
        "Origin", "Accept", "Content-Type", "Authorization", "Prefer", "If-Match", "If-None-Exist",
        "If-None-Match", "If-Modified-Since", "X-Requested-With", "Cache-Control"));
    cors.setExposedHeaders(List.of("Location", "Content-Location", "ETag", "Last-Modified", "X-Progress"));
    cors.setMaxAge(3600L);
    return cors;
  }
}
