package org.fhirtwin.sandbox;

import jakarta.servlet.FilterChain;
import jakarta.servlet.ServletException;
import jakarta.servlet.http.HttpServletRequest;
import jakarta.servlet.http.HttpServletResponse;
import jakarta.servlet.http.HttpServletResponseWrapper;
import java.io.IOException;
import org.springframework.web.filter.OncePerRequestFilter;

/**
 * HAPI answers every in-progress Bulk Data status poll with a fixed {@code Retry-After: 120}. The
 * sandbox runs batch maintenance every second, so a client that honours the header would wait two
 * minutes for an export that is ready in two seconds; this filter caps the header for status polls.
 */
public class ExportRetryAfterFilter extends OncePerRequestFilter {

  private final String retryAfterSeconds;

  public ExportRetryAfterFilter(long retryAfterSeconds) {
    this.retryAfterSeconds = Long.toString(retryAfterSeconds);
  }

  @Override
  protected boolean shouldNotFilter(HttpServletRequest request) {
    return !request.getRequestURI().contains("$export-poll-status");
  }

  @Override
  protected void doFilterInternal(HttpServletRequest request, HttpServletResponse response, FilterChain chain)
      throws ServletException, IOException {
    chain.doFilter(request, new HttpServletResponseWrapper(response) {
      @Override
      public void addHeader(String name, String value) {
        super.addHeader(name, capped(name, value));
      }

      @Override
      public void setHeader(String name, String value) {
        super.setHeader(name, capped(name, value));
      }
    });
  }

  private String capped(String name, String value) {
    return "Retry-After".equalsIgnoreCase(name) ? retryAfterSeconds : value;
  }
}
